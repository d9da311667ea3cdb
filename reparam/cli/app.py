"""The ``reparam`` command line: fuse, inspect, bench, rules.

Exit codes: 0 success; 2 bad usage or input (missing file, unknown format, a model that fails to load, a
shape that does not fit, an output that would overwrite an input, unknown rule); 3 the fused model failed
verification (end to end or a rewrite's local check, or rules that never settle); 1 an unexpected internal
error (``--debug`` shows the traceback); 130 / 143 interrupted (Ctrl-C) / terminated (SIGTERM). Every error
is one ``reparam: error:`` line on stderr, usage errors included. On any failure nothing is written.
"""
from __future__ import annotations

import os
import signal
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch
import typer
from rich.console import Console
from typer.core import TyperGroup
from typing_extensions import Annotated

from reparam import __version__
from reparam.cli.catalogue import rule_catalogue
from reparam.cli.render import (Steps, error_text, fired_table, fired_text, latency_table, refusals_table, summary_table)
from reparam.errors import CaptureError, FixpointError, ReparamError, RewriteMismatch, VerificationError
from reparam.io.loading import PICKLE_SUFFIXES, Loaded, input_kind, load_model
from reparam.core.registry import load_rule_file
from reparam.frontends.rulesets import select_rules
from reparam.core.report import Report
from reparam.io.saving import atomic_paths, check_writable, json_text, output_format, write_model

try:  # typer ≥ 0.26 vendors click; before, it used the click package
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, UsageError

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_VERIFY, EXIT_TERMINATED = 0, 1, 2, 3, 143


class _OneLineErrors(TyperGroup):
    """Usage errors (a missing option, an unknown command) as one ``reparam: error:`` line like every other
    error, instead of click's framed box."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except UsageError as err:
            code = err.exit_code
            if type(err).__name__ != "NoArgsIsHelpError":  # a bare `reparam`: the help is printed already
                where = err.ctx.command_path if err.ctx else "reparam"
                print(f"reparam: error: {' '.join(err.format_message().split())} (see {where} --help)",
                      file=sys.stderr)
        except ClickException as err:
            code = err.exit_code
            print(f"reparam: error: {' '.join(err.format_message().split())}", file=sys.stderr)
        except typer.Abort:
            code = EXIT_INTERNAL
            print("reparam: error: aborted", file=sys.stderr)
        sys.exit(code or EXIT_OK)


app = typer.Typer(name="reparam", cls=_OneLineErrors, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  help="Fuse multi-branch training-time models into single-branch deploy models, verified in "
                       "float64. Exit codes: 0 ok, 2 usage/input error, 3 verification failure, 1 internal error.")

ModelArg = Annotated[str, typer.Argument(metavar="IN", show_default=False,
                                         help=f"Model: FILE{'/'.join(PICKLE_SUFFIXES)} (torch.save, needs "
                                              f"--trust), FILE.pt2 (torch.export), FILE.onnx, or "
                                              f"pkg.module:factory.")]
InputShapeOpt = Annotated[Optional[List[str]], typer.Option(
    "--input-shape", "-s", metavar="SHAPE", show_default=False,
    help="Input shape such as 1,3,224,224; repeat for several inputs. Default: guessed from the first layer.")]
RulesOpt = Annotated[Optional[List[Path]], typer.Option(
    "--rules", metavar="FILE.py", show_default=False,
    help="Python file of extra rules (@reparam.core.rule), tried before the built-in ones; repeatable. Runs as code.")]
DisableOpt = Annotated[Optional[List[str]], typer.Option(
    "--disable", metavar="RULE", show_default=False, help="Do not use this rule; repeatable.")]
OnlyOpt = Annotated[Optional[List[str]], typer.Option(
    "--only", metavar="RULE", show_default=False, help="Use only this rule; repeatable.")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust", help=f"Allow unpickling a full model ({'/'.join(PICKLE_SUFFIXES)}): this runs code from the file.")]
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


class _Terminated(BaseException):
    """SIGTERM, raised where the program is so that every cleanup runs (no temporary file is left)."""


def _terminate(signum, frame):
    raise _Terminated()


def _guarded(debug: bool, body: Callable[[], int | None], shape_hint: bool = False) -> None:
    """Run ``body``; known errors become one line on stderr and an exit code, unexpected ones too (or a
    traceback with ``--debug``). ``shape_hint``: no input shape was given, so a capture error suggests one."""
    if not debug:
        warnings.simplefilter("ignore")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        code = body()
    except (typer.Exit, typer.Abort):
        raise
    except (VerificationError, RewriteMismatch) as err:
        raise _fail(f"verification failed: {err}", EXIT_VERIFY)
    except FixpointError as err:
        raise _fail(f"the rules did not settle: {err}", EXIT_VERIFY)
    except CaptureError as err:
        raise _fail(f"{err}{' (set the input shape with --input-shape)' if shape_hint else ''}", EXIT_INPUT)
    except ReparamError as err:
        raise _fail(str(err), EXIT_INPUT)
    except KeyboardInterrupt:
        raise _fail("interrupted; nothing was written", 130)
    except _Terminated:
        raise _fail("terminated; nothing was written", EXIT_TERMINATED)
    except BrokenPipeError:  # stdout closed early (`reparam rules | head`): stop quietly, like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141)
    except Exception as err:
        if debug:
            raise
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise _fail(f"unexpected {type(err).__name__}: {first} (a bug in reparam or the model; rerun with --debug "
                    f"for the traceback)", EXIT_INTERNAL)
    finally:
        signal.signal(signal.SIGTERM, previous)
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
        from reparam.frontends.fx.capture import example_inputs_for

        return example_inputs_for(loaded.obj)
    if loaded.kind == "exported":
        from reparam.frontends.aten.backend import example_inputs

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
        fused, rep = _fuse_with(loaded, inputs, shapes, rules, verify, tolerance, enter)
    if loaded.kind == "module" and not shapes and inputs is not None:
        guessed = ", ".join(",".join(map(str, t.shape)) for t in inputs)
        rep.notes.append(f"no --input-shape given: guessed the input shape {guessed} from the first layer")
    return fused, rep


def _fuse_with(loaded: Loaded, inputs, shapes, rules, verify, tolerance, enter):
    opts = dict(rules=rules, verify=verify, report=True)
    if tolerance is not None:
        opts["tolerance"] = tolerance
    if loaded.kind == "module":
        from reparam.frontends.fx.backend import fuse

        return fuse(loaded.obj, inputs, progress=enter, **opts)
    if loaded.kind == "exported":
        try:
            from reparam.frontends.aten.backend import fuse_exported
        except ImportError as err:
            raise ReparamError(f"fusing .pt2 programs is not available in this installation ({err})") from err
        return fuse_exported(loaded.obj, **opts)
    try:
        from reparam.frontends.onnx.backend import fuse_onnx
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


def _check_outputs(model: str, output: Path, report: Path | None, weights: Path | None,
                   rule_files: list[Path] | None) -> None:
    """Before any work: OUT and the report can be written, and overwrite neither an input nor each other."""
    inputs = [(Path(model), "the input file")] if input_kind(model) != "factory" else []
    inputs += [(weights, "the --weights file")] if weights is not None else []
    inputs += [(f, "a --rules file") for f in rule_files or []]
    targets = [("output", output)] + ([("report", report)] if report is not None else [])
    for what, path in targets:
        for source, label in inputs:
            if _same_file(source, path):
                raise ReparamError(f"the {what} '{path}' is {label}; choose another {what} path")
        check_writable(path, what)
    if report is not None and _same_file(output, report):
        raise ReparamError(f"the report '{report}' is the output file; choose another report path")


def _json_out(data: Any) -> None:
    print(json_text(data), end="")


def _load(model: str, trust: bool, weights: Path | None, steps: Steps) -> Loaded:
    input_kind(model)  # unknown formats fail before anything is read
    with steps.step(f"loading {model}"):
        return load_model(model, trust=trust, weights=weights)


# ---------------------------------------------------------------------------------------------- commands

@app.command()
def fuse(model: ModelArg,
         output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT", show_default=False,
                                              help="Where to write the fused model: .pt/.pth (torch.save; load "
                                                   "with torch.load(OUT, weights_only=False)), .pt2 "
                                                   "(torch.export) or .onnx.")],
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
        _check_outputs(model, output, report, weights, rules)
        if input_kind(model) == "onnx" and fmt != "onnx":
            raise ReparamError(f"an ONNX input can only be written as .onnx, not '{output.suffix}'")
        if tolerance is not None and not tolerance >= 0:  # NaN too
            raise ReparamError(f"--tolerance must be a number ≥ 0, got {tolerance}")
        shapes = [parse_shape(s) for s in input_shape or []]
        chosen = _rule_list(rules, disable, only)
        steps = Steps(_stderr, quiet)
        loaded = _load(model, trust, weights, steps)
        inputs = _example_inputs(loaded, shapes)
        if loaded.kind == "module" and inputs is None and fmt != "pt":
            raise ReparamError(f"writing .{fmt} needs example inputs and none could be guessed: pass --input-shape")
        fused, rep = _fuse(loaded, inputs, shapes, chosen, verify, tolerance, steps)
        t0 = time.perf_counter()
        targets = [output] + ([report] if report is not None else [])
        with steps.step(f"writing {output} ({fmt})"), atomic_paths(*targets) as temps:  # all or nothing
            write_model(loaded.packed(fused) if fmt == "pt" else fused, temps[0], fmt, inputs)
            rep.seconds["write"] = time.perf_counter() - t0
            doc = {"input": model, "output": str(output), "format": fmt, "report": rep.to_dict()}
            if report is not None:
                Path(temps[1]).write_text(json_text(doc))
        if as_json:
            _json_out(doc)
        elif not quiet:
            _stdout.print(summary_table(rep, title=f"{model} → {output}"))
            _print_notes(rep)
    _guarded(debug, body, shape_hint=not input_shape)


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
    _guarded(debug, body, shape_hint=not input_shape)


def _regions(loaded: Loaded, inputs, rep: Report) -> list[str]:
    """The parts fused as one graph each: the whole model, or its traceable submodules."""
    if loaded.kind != "module" or "" not in rep.opaque:
        return ["<whole model>"]
    import copy

    from reparam.frontends.fx.capture import capture

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
    _guarded(debug, body, shape_hint=not input_shape)


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
        entries = rule_catalogue(select_rules(None, extra))  # checks the names are unique
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
