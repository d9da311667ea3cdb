"""Layer 2, the core: ops (the vocabulary, each owning its semantics), the IR, patterns, rules, the engine with
its local checks, and the report data. Knows no graph library: front ends import into and export from it."""
