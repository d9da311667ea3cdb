"""The ``reparam`` command line: fuse, inspect, bench, rules.

Exit codes: 0 success; 2 bad usage or input (missing file, unknown format, a model that fails to load, a
shape that does not fit, output = input, unknown rule); 3 the fused model failed verification (end to end
or a rewrite's local check, or rules that never settle); 1 an unexpected internal error (``--debug`` shows
the traceback). On any failure nothing is written.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch
import typer
from rich.console import Console
from typing_extensions import Annotated

from . import __version__
from .catalogue import rule_catalogue
from .cli_render import (Steps, error_text, fired_table, fired_text, latency_table, refusals_table,
                         summary_table)
from .errors import CaptureError, FixpointError, ReparamError, RewriteMismatch, VerificationError
from .loading import Loaded, input_kind, load_model
from .registry import builtin_rules, load_rule_file, select_rules
from .report import Report
from .saving import output_format, save_model, write_json

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_VERIFY = 0, 1, 2, 3

app = typer.Typer(name="reparam", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fuse multi-branch training-time models into single-branch deploy models, verified in "
                       "float64. Exit codes: 0 ok, 2 usage/input error, 3 verification failure, 1 internal error.")

ModelArg = Annotated[str, typer.Argument(metavar="IN", show_default=False,
                                         help="Model: FILE.pt/.pth (torch.save, needs --trust), FILE.pt2 "
                                              "(torch.export), FILE.onnx, or pkg.module:factory.")]
InputShapeOpt = Annotated[Optional[List[str]], typer.Option(
    "--input-shape", "-s", metavar="SHAPE", show_default=False,
    help="Input shape such as 1,3,224,224; repeat for several inputs. Default: guessed from the first layer.")]
RulesOpt = Annotated[Optional[List[Path]], typer.Option(
    "--rules", metavar="FILE.py", show_default=False,
    help="Python file of extra rules (@reparam.rule), tried before the built-in ones; repeatable. Runs as code.")]
DisableOpt = Annotated[Optional[List[str]], typer.Option(
    "--disable", metavar="RULE", show_default=False, help="Do not use this rule; repeatable.")]
OnlyOpt = Annotated[Optional[List[str]], typer.Option(
    "--only", metavar="RULE", show_default=False, help="Use only this rule; repeatable.")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust", help="Allow unpickling a full model (.pt/.pth): this runs code from the file.")]
WeightsOpt = Annotated[Optional[Path], typer.Option(
    "--weights", "-w", metavar="FILE", show_default=False,
    help="Weights for the model (state_dict, or a checkpoint with 'state_dict'/'model'), loaded with "
         "weights_only=True.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document on stdout instead of tables.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks and warnings.")]

_stderr = Console(stderr=True)
_stdout = Console()


def _version(value: bool):
    if value:
        print(f"reparam {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")] = False):
    """Fuse multi-branch training-time models into single-branch deploy models, verified in float64."""


# ---------------------------------------------------------------------------------------------- helpers

def _fail(message: str, code: int) -> typer.Exit:
    print(f"reparam: error: {message}", file=sys.stderr)
    return typer.Exit(code)


def _guarded(debug: bool, body: Callable[[], int | None]) -> None:
    """Run ``body``; known errors become one line on stderr and an exit code, unexpected ones too (or a
    traceback with ``--debug``)."""
    if not debug:
        warnings.simplefilter("ignore")
    try:
        code = body()
    except (typer.Exit, typer.Abort):
        raise
    except (VerificationError, RewriteMismatch, FixpointError) as err:
        raise _fail(f"verification failed: {err}", EXIT_VERIFY)
    except CaptureError as err:
        raise _fail(f"{err} (set the input shape with --input-shape)", EXIT_INPUT)
    except ReparamError as err:
        raise _fail(str(err), EXIT_INPUT)
    except KeyboardInterrupt:
        raise _fail("interrupted; nothing was written", 130)
    except BrokenPipeError:  # stdout closed early (`reparam rules | head`): stop quietly, like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141)
    except Exception as err:
        if debug:
            raise
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise _fail(f"unexpected {type(err).__name__}: {first} (a bug in reparam or the model; rerun with --debug "
                    f"for the traceback)", EXIT_INTERNAL)
    raise typer.Exit(code or EXIT_OK)


def parse_shape(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise ReparamError(f"bad --input-shape '{text}': expected positive integers separated by commas, "
                           f"like 1,3,224,224")
    return shape


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _example_inputs(loaded: Loaded, shapes: list[tuple[int, ...]]) -> tuple | None:
    """Random inputs for a PyTorch module: the given shapes, else the library's guess from the first layer."""
    gen = torch.Generator().manual_seed(0)
    if loaded.kind == "module":
        if shapes:
            dtype = _model_dtype(loaded.obj)
            return tuple(torch.randn(s, generator=gen).to(dtype) for s in shapes)
        from .capture import example_inputs_for

        return example_inputs_for(loaded.obj)
    if loaded.kind == "exported":
        from .export_backend import example_inputs

        args, _ = example_inputs(loaded.obj)
        if shapes and [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)] != shapes:
            raise ReparamError(f"the program was exported for input shapes "
                               f"{[list(a.shape) for a in args]}; --input-shape cannot change them")
        return tuple(torch.randn(a.shape, generator=gen).to(a.dtype) if isinstance(a, torch.Tensor)
                     and a.is_floating_point() else a for a in args)
    return None


def _rule_list(rule_files: list[Path] | None, disable: list[str] | None, only: list[str] | None):
    extra = [r for f in rule_files or [] for r in load_rule_file(f)]
    return select_rules(None, extra, disable or [], only or None)


_PHASES = {"rewrite": "capturing and rewriting", "verify": "verifying end to end in float64"}


def _fuse(loaded: Loaded, inputs: tuple | None, shapes: list, rules, verify: bool, tolerance: float | None,
          steps: Steps):
    """Dispatch on the input kind; returns (fused object, Report). ``tolerance`` None: the backend's default."""
    fallback = "capturing, rewriting and verifying" if verify else "capturing and rewriting"
    with steps.phases(fallback, _PHASES) as enter:
        return _fuse_with(loaded, inputs, shapes, rules, verify, tolerance, enter)


def _fuse_with(loaded: Loaded, inputs, shapes, rules, verify, tolerance, enter):
    opts = dict(rules=rules, verify=verify, report=True)
    if tolerance is not None:
        opts["tolerance"] = tolerance
    if loaded.kind == "module":
        from .api import fuse

        return fuse(loaded.obj, inputs, progress=enter, **opts)
    if loaded.kind == "exported":
        try:
            from .export_backend import fuse_exported
        except ImportError as err:
            raise ReparamError(f"fusing .pt2 programs is not available in this installation ({err})") from err
        return fuse_exported(loaded.obj, **opts)
    try:
        from .onnx_backend import fuse_onnx
    except ImportError as err:
        raise ReparamError(f"fusing ONNX models is not available in this installation ({err}); "
                           f"pip install 'reparam[onnx]'") from err
    return fuse_onnx(loaded.obj, input_shapes=[list(s) for s in shapes] or None, **opts)


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _json_out(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _load(model: str, trust: bool, weights: Path | None, steps: Steps) -> Loaded:
    input_kind(model)  # unknown formats fail before anything is read
    with steps.step(f"loading {model}"):
        return load_model(model, trust=trust, weights=weights)


# ---------------------------------------------------------------------------------------------- commands

@app.command()
def fuse(model: ModelArg,
         output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT", show_default=False,
                                              help="Where to write the fused model: .pt (torch.save; load with "
                                                   "torch.load(OUT, weights_only=False)), .pt2 (torch.export) "
                                                   "or .onnx.")],
         input_shape: InputShapeOpt = None,
         tolerance: Annotated[Optional[float], typer.Option(
             "--tolerance", metavar="RTOL", show_default=False,
             help="Largest relative error max|fused − original| / max|original| accepted. Default: 1e-9 for "
                  "PyTorch inputs (float64), 1e-4 for ONNX (float32 onnxruntime).")] = None,
         rules: RulesOpt = None, disable: DisableOpt = None, only: OnlyOpt = None,
         verify: Annotated[bool, typer.Option("--verify/--no-verify",
                                              help="Compare the fused model with the original end to end in "
                                                   "float64 (the default); --no-verify skips it.")] = True,
         report: Annotated[Optional[Path], typer.Option("--report", metavar="FILE.json", show_default=False,
                                                        help="Also write the full report as JSON.")] = None,
         trust: TrustOpt = False, weights: WeightsOpt = None,
         quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
         as_json: JsonOpt = False, debug: DebugOpt = False):
    """Fuse IN and write the deploy model to OUT (format chosen by OUT's extension).

    Example: reparam fuse examples.repnext:repnext_m1 --weights ckpt.pth -s 1,3,224,224 -o deploy.pt

    Exit codes: 0 written; 2 usage or input error; 3 verification failed. On failure nothing is written.
    """
    def body():
        fmt = output_format(output)
        if input_kind(model) != "factory" and _same_file(Path(model), output):
            raise ReparamError(f"the output '{output}' is the input file; choose another output path")
        if report is not None and (report == output or (input_kind(model) != "factory"
                                                        and _same_file(Path(model), report))):
            raise ReparamError(f"the report '{report}' would overwrite the model; choose another path")
        if input_kind(model) == "onnx" and fmt != "onnx":
            raise ReparamError(f"an ONNX input can only be written as .onnx, not '{output.suffix}'")
        if tolerance is not None and tolerance < 0:
            raise ReparamError(f"--tolerance must be ≥ 0, got {tolerance}")
        shapes = [parse_shape(s) for s in input_shape or []]
        chosen = _rule_list(rules, disable, only)
        steps = Steps(_stderr, quiet)
        loaded = _load(model, trust, weights, steps)
        inputs = _example_inputs(loaded, shapes)
        if loaded.kind == "module" and inputs is None and fmt != "pt":
            raise ReparamError(f"writing .{fmt} needs example inputs and none could be guessed: pass --input-shape")
        fused, rep = _fuse(loaded, inputs, shapes, chosen, verify, tolerance, steps)
        t0 = time.perf_counter()
        with steps.step(f"writing {output} ({fmt})"):
            save_model(fused, output, inputs)
        rep.seconds["write"] = time.perf_counter() - t0
        doc = {"input": model, "output": str(output), "format": fmt, "report": rep.to_dict()}
        if report is not None:
            try:
                write_json(doc, report)
            except BaseException:
                output.unlink(missing_ok=True)  # all or nothing
                raise
        if as_json:
            _json_out(doc)
        elif not quiet:
            _stdout.print(summary_table(rep, title=f"{model} → {output}"))
            _print_notes(rep)
    _guarded(debug, body)


def _print_notes(rep: Report, dry_run: bool = False) -> None:
    for path, why in rep.opaque.items():
        _stdout.print(f"opaque: '{path or '<model>'}' was left as is ({why})", highlight=False)
    for note in rep.notes:
        _stdout.print(f"note: {note}", highlight=False)
    if rep.refusals and not dry_run:
        _stdout.print(f"{len(rep.refusals)} refused match(es); `reparam inspect` lists them", highlight=False)


@app.command()
def inspect(model: ModelArg, input_shape: InputShapeOpt = None, rules: RulesOpt = None,
            disable: DisableOpt = None, only: OnlyOpt = None, trust: TrustOpt = False,
            weights: WeightsOpt = None, as_json: JsonOpt = False, debug: DebugOpt = False):
    """Dry run: show the regions, the rules that would fire (and where), the refusals and the op/param
    counts before → after, without verifying or writing anything.

    Example: reparam inspect model.pt --trust -s 1,3,224,224
    """
    def body():
        shapes = [parse_shape(s) for s in input_shape or []]
        chosen = _rule_list(rules, disable, only)
        steps = Steps(_stderr, as_json)
        loaded = _load(model, trust, weights, steps)
        inputs = _example_inputs(loaded, shapes)
        _, rep = _fuse(loaded, inputs, shapes, chosen, False, None, steps)
        regions = _regions(loaded, inputs, rep)
        if as_json:
            _json_out({"input": model, "regions": regions, "report": rep.to_dict()})
            return
        _stdout.print("regions: " + ", ".join(regions), highlight=False)
        _stdout.print(fired_table(rep))
        if rep.refusals:
            _stdout.print(refusals_table(rep))
        _stdout.print(summary_table(rep, title="counts before → after (dry run: not verified, nothing written)",
                                    dry_run=True))
        _print_notes(rep, dry_run=True)
    _guarded(debug, body)


def _regions(loaded: Loaded, inputs, rep: Report) -> list[str]:
    """The parts fused as one graph each: the whole model, or its traceable submodules."""
    if loaded.kind != "module" or "" not in rep.opaque:
        return ["<whole model>"]
    import copy

    from .capture import capture

    return [r.path or "<whole model>" for r in capture(copy.deepcopy(loaded.obj).eval(), inputs).regions]


@app.command()
def bench(model: ModelArg, input_shape: InputShapeOpt = None,
          threads: Annotated[int, typer.Option("--threads", "-t", min=1, help="torch intra-op threads.")] = 2,
          repeat: Annotated[int, typer.Option("--repeat", "-n", min=1, help="Timed runs per model.")] = 20,
          warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs per model first.")] = 3,
          rules: RulesOpt = None, disable: DisableOpt = None, only: OnlyOpt = None,
          verify: Annotated[bool, typer.Option("--verify/--no-verify",
                                               help="Verify the fused model before timing it.")] = True,
          trust: TrustOpt = False, weights: WeightsOpt = None, as_json: JsonOpt = False, debug: DebugOpt = False):
    """Time the original model against the fused one (torch eager, CPU): median latency and speed-up.
    The batch size is the first dimension of --input-shape.

    Example: reparam bench examples.repnext:repnext_m1 -s 8,3,224,224 --threads 2
    """
    def body():
        if input_kind(model) == "onnx":
            raise ReparamError("bench times PyTorch models in eager mode; give a .pt, .pt2 or factory input")
        shapes = [parse_shape(s) for s in input_shape or []]
        chosen = _rule_list(rules, disable, only)
        torch.set_num_threads(threads)
        steps = Steps(_stderr, as_json)
        loaded = _load(model, trust, weights, steps)
        inputs = _example_inputs(loaded, shapes)
        if inputs is None:
            raise ReparamError("no input shape could be guessed: pass --input-shape")
        fused, rep = _fuse(loaded, inputs, shapes, chosen, verify, None, steps)
        original = loaded.obj.module() if loaded.kind == "exported" else loaded.obj.eval()
        fused = fused.module() if isinstance(fused, torch.export.ExportedProgram) else fused
        with steps.step(f"timing ({warmup} warm-up + {repeat} runs each, {threads} threads)"):
            t_orig, t_fused = _median_latency([original, fused], inputs, warmup, repeat)
        ratio = t_orig / t_fused
        shapes_text = ", ".join("×".join(map(str, t.shape)) for t in inputs if isinstance(t, torch.Tensor))
        if as_json:
            _json_out({"input": model, "input_shapes": [list(t.shape) for t in inputs], "threads": threads,
                       "repeat": repeat, "median_ms": {"original": t_orig * 1e3, "fused": t_fused * 1e3},
                       "speedup": ratio, "max_error": error_text(rep), "rules_fired": rep.fired_counts()})
            return
        _stdout.print(f"median latency, torch eager, input {shapes_text}, {threads} thread(s), {repeat} runs "
                      f"(interleaved)", highlight=False)
        _stdout.print(latency_table([("original", t_orig), ("fused", t_fused)], ratio))
        _stdout.print(f"max error: {error_text(rep)}; rules fired: {fired_text(rep)}", highlight=False)
    _guarded(debug, body)


def _median_latency(models, inputs: tuple, warmup: int, repeat: int) -> list[float]:
    """Median seconds per call for each model, runs interleaved so both see the same machine state."""
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for m in models:
            for _ in range(warmup):
                m(*inputs)
        for _ in range(repeat):
            for i, m in enumerate(models):
                t0 = time.perf_counter()
                m(*inputs)
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


@app.command("rules")
def list_rules(rules: RulesOpt = None, as_json: JsonOpt = False, debug: DebugOpt = False):
    """List the rules in the order they are tried, each with the identity it applies.

    Example: reparam rules --rules my_rules.py
    """
    def body():
        extra = [r for f in rules or [] for r in load_rule_file(f)]
        entries = rule_catalogue(extra + builtin_rules())
        if as_json:
            _json_out([{"name": n, "identity": i, "doc": d, "user": k < len(extra)}
                       for k, (n, i, d) in enumerate(entries)])
            return
        from rich.table import Table

        table = Table(show_edge=False, pad_edge=False)
        table.add_column("#", justify="right")
        table.add_column("rule", style="bold", no_wrap=True)
        table.add_column("identity")
        for k, (name, identity, _) in enumerate(entries, 1):
            table.add_row(str(k), name + (" (user)" if k <= len(extra) else ""), identity)
        _stdout.print(table)
    _guarded(debug, body)


if __name__ == "__main__":  # pragma: no cover
    app()
