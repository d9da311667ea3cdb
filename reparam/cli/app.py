"""The ``reparam`` command line: fuse, inspect, bench, rules.

Exit codes: 0 success; 2 a user or environment error (bad usage or input: missing file, unknown format, a
model that fails to load or holds non-finite weights, a shape that does not fit or does not fit in memory,
an output name too long, a full disk, an output that would overwrite an input, unknown rule); 3 the fused
model failed verification (end to end or a rewrite's local check, or rules that never settle); 1 an
unexpected internal error (``--debug`` shows the traceback); 130 / 143 interrupted (Ctrl-C) / terminated
(SIGTERM). Every error is one ``reparam: error:`` line on stderr, usage errors included. On any failure the
output is not written (``--report`` is, with the error).

Importing this module imports neither torch nor rich: ``reparam --version`` and ``--help`` stay fast; every
command imports what it needs when it runs.
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

import typer
from typing_extensions import Annotated

from reparam import __version__
from reparam.errors import CaptureError, FixpointError, ReparamError, RewriteMismatch, VerificationError
from reparam.io.formats import PICKLE_SUFFIXES, companion_paths, input_kind, output_format

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_VERIFY, EXIT_TERMINATED = 0, 1, 2, 3, 143
SCHEMA_VERSION = 1  # of the JSON documents of --json and --report

app = typer.Typer(name="reparam", add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
                  help="Fuse multi-branch training-time models into single-branch deploy models, verified in "
                       "float64. Exit codes: 0 ok, 2 usage/input error, 3 verification failure, 1 internal error.")

ModelArg = Annotated[str, typer.Argument(metavar="IN", show_default=False,
                                         help=f"Model: FILE{'/'.join(PICKLE_SUFFIXES)} (torch.save, needs "
                                              f"--trust), FILE.pt2 (torch.export), FILE.onnx, pkg.module:factory "
                                              f"or timm:NAME.")]
InputShapeOpt = Annotated[Optional[List[str]], typer.Option(
    "--input-shape", "-s", metavar="SHAPE", show_default=False,
    help="Input shape such as 1,3,224,224; repeat for several inputs. Default: guessed from the first layer.")]
ArgOpt = Annotated[Optional[List[str]], typer.Option(
    "--arg", "-a", metavar="NAME=VALUE", show_default=False,
    help="Keyword argument for a factory (a Python literal, else a string); repeatable.")]
RulesOpt = Annotated[Optional[List[Path]], typer.Option(
    "--rules", metavar="FILE.py", show_default=False,
    help="Python file of extra rules (@reparam.rule), tried before the built-in ones; repeatable. Runs as code.")]
DisableOpt = Annotated[Optional[List[str]], typer.Option(
    "--disable", metavar="RULE", show_default=False, help="Do not use this rule; repeatable.")]
OnlyOpt = Annotated[Optional[List[str]], typer.Option(
    "--only", metavar="RULE", show_default=False, help="Use only this rule; repeatable.")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust", help=f"Allow loading what runs code: a pickled model ({'/'.join(PICKLE_SUFFIXES)}), a .pt2 "
                    f"whose pickled entries are not plain tensors.")]
WeightsOpt = Annotated[Optional[Path], typer.Option(
    "--weights", "-w", metavar="FILE", show_default=False,
    help="Weights for the model (state_dict, or a checkpoint with 'state_dict'/'model'), loaded with "
         "weights_only=True.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document on stdout instead of tables.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks and warnings.")]


def _version(value: bool):
    if value:
        print(f"reparam {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False):
    """Fuse multi-branch training-time models into single-branch deploy models, verified in float64."""


def main(argv: list[str] | None = None) -> None:
    """The console script: the commands, with usage errors as one ``reparam: error:`` line like every other
    error (click's own error box is not used)."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="reparam", standalone_mode=False)
    except typer.Abort:
        code = EXIT_INTERNAL
        print("reparam: error: aborted", file=sys.stderr)
    except Exception as err:
        if not isinstance(err, _usage_error_types()):
            raise
        code = getattr(err, "exit_code", EXIT_INPUT)
        if type(err).__name__ == "NoArgsIsHelpError":  # a bare `reparam`: show the help
            print(err.format_message(), file=sys.stderr)
        else:
            ctx = getattr(err, "ctx", None)
            where = f" (see {ctx.command_path} --help)" if ctx is not None and code == EXIT_INPUT else ""
            print(f"reparam: error: {' '.join(err.format_message().split())}{where}", file=sys.stderr)
    sys.exit(code or EXIT_OK)


def _usage_error_types() -> tuple[type, ...]:
    """click's ClickException (UsageError, BadParameter, …): typer ≥ 0.26 vendors click and derives them from
    typer.TyperException; older typer raises those of the click package."""
    types: list[type] = [t for t in [getattr(typer, "TyperException", None)] if t is not None]
    try:
        import click

        types.append(click.ClickException)
    except ImportError:
        pass
    return tuple(types)


# ---------------------------------------------------------------------------------------------- consoles

_consoles: dict[str, Any] = {}


def _console(stream: str):
    """The rich Console of stdout or stderr, made on first use (rich is imported only by commands)."""
    if stream not in _consoles:
        from rich.console import Console

        _consoles[stream] = Console(stderr=stream == "stderr")
    return _consoles[stream]


def _say(text: str) -> None:
    """A line on stdout, never wrapped."""
    print(text, flush=True)


def _show(renderable) -> None:
    from reparam.cli.render import show

    show(_console("stdout"), renderable)


# ---------------------------------------------------------------------------------------------- errors

def _fail(message: str, code: int) -> typer.Exit:
    print(f"reparam: error: {message}", file=sys.stderr)
    return typer.Exit(code)


class _Terminated(BaseException):
    """SIGTERM, raised where the program is so that every cleanup runs (no temporary file is left)."""


def _terminate(signum, frame):
    raise _Terminated()


def _out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and any(
        s in text for s in ("can't allocate memory", "out of memory", "defaultcpuallocator", "not enough memory")))


def _torch_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return None


class Run:
    """What one command has done so far: the JSON document it prints with ``--json`` / writes with
    ``--report`` (also on failure, with the error), and the phase clocks."""

    def __init__(self, command: str, as_json: bool = False, report: Path | None = None):
        self.command, self.as_json, self.report = command, as_json, report
        self.report_checked = False  # the report path passed the checks (it overwrites no input)
        self.started = time.perf_counter()
        self.fields: dict[str, Any] = {}
        self.steps = None  # the cli_render.Steps of the run, once made

    def seconds(self) -> dict[str, float]:
        out = dict(self.steps.seconds) if self.steps is not None else {}
        out["total"] = time.perf_counter() - self.started
        return out

    def document(self, status: str, error: dict | None = None) -> dict:
        doc = {"schema_version": SCHEMA_VERSION, "tool": {"name": "reparam", "version": __version__},
               "torch": _torch_version(), "command": self.command, "status": status}
        doc.update(self.fields)
        doc["seconds"] = self.seconds()
        if error is not None:
            doc["error"] = error
        return doc

    def failed(self, code: int, kind: str, message: str) -> None:
        """Print (``--json``) and write (``--report``) the failure's document, then the error line."""
        doc = self.document("error", {"code": code, "kind": kind, "message": message,
                                      "phase": getattr(self.steps, "current", None)})
        if self.as_json:
            from reparam.io.saving import json_text

            print(json_text(doc), end="")
        if self.report is not None and self.report_checked:
            try:
                from reparam.io.saving import write_json

                write_json(doc, self.report)
            except Exception:  # the error line below is what matters
                pass


def _guarded(debug: bool, body: Callable[[], int | None], run: Run, shape_hint: bool = False) -> None:
    """Run ``body``; known errors become one line on stderr and an exit code, unexpected ones too (or a
    traceback with ``--debug``). ``shape_hint``: no input shape was given for a PyTorch module, so a capture
    error suggests one."""
    if not debug:
        warnings.simplefilter("ignore")
    previous = signal.signal(signal.SIGTERM, _terminate)

    def fail(message: str, code: int, kind: str) -> typer.Exit:
        if run.steps is not None:
            run.steps.close()
        run.failed(code, kind, message)
        return _fail(message, code)

    try:
        code = body()
    except (typer.Exit, typer.Abort):
        raise
    except RewriteMismatch as err:
        raise fail(f"verification failed: rule '{err.rule}' at '{err.where}' changed outputs: {err.detail}. The "
                   f"rule is wrong for this case: rerun with --disable {err.rule} and report it",
                   EXIT_VERIFY, "verification")
    except VerificationError as err:
        raise fail(f"verification failed: {err}", EXIT_VERIFY, "verification")
    except FixpointError as err:
        raise fail(f"the rules did not settle: {err}", EXIT_VERIFY, "verification")
    except CaptureError as err:
        raise fail(f"{err}{' (set the input shape with --input-shape)' if shape_hint else ''}", EXIT_INPUT, "input")
    except ReparamError as err:
        raise fail(str(err), EXIT_INPUT, "input")
    except KeyboardInterrupt:
        raise fail("interrupted; nothing was written", 130, "interrupted")
    except _Terminated:
        raise fail("terminated; nothing was written", EXIT_TERMINATED, "terminated")
    except BrokenPipeError:  # stdout closed early (`reparam rules | head`): stop quietly, like other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141)
    except Exception as err:
        if debug:
            raise
        phase = getattr(run.steps, "current", None)
        where = f" while {phase}" if phase else ""
        if _out_of_memory(err):
            raise fail(f"out of memory{where}; give a smaller --input-shape or use a machine with more memory",
                       EXIT_INPUT, "environment")
        if isinstance(err, OSError):
            name = f" '{err.filename}'" if err.filename else ""
            raise fail(f"cannot access{name}{where}: {err.strerror or err}", EXIT_INPUT, "environment")
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise fail(f"unexpected {type(err).__name__}{where}: {first} (a bug in reparam or the model; rerun with "
                   f"--debug for the traceback)", EXIT_INTERNAL, "internal")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if run.steps is not None:
            run.steps.close()
    raise typer.Exit(code or EXIT_OK)


# ---------------------------------------------------------------------------------------------- inputs

_MAX_DIM = 2 ** 31 - 1


def parse_shape(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise ReparamError(f"bad --input-shape '{text}': expected positive integers separated by commas, "
                           f"like 1,3,224,224")
    if any(d > _MAX_DIM for d in shape):
        raise ReparamError(f"bad --input-shape '{text[:60]}': a dimension is larger than {_MAX_DIM:,}")
    return shape


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _random_inputs(shapes: list[tuple[int, ...]], dtype) -> tuple:
    """Random tensors of ``shapes``; an input larger than the machine's memory, or one that cannot be
    allocated, is refused naming --input-shape."""
    import math

    import torch

    gen = torch.Generator().manual_seed(0)
    itemsize = torch.empty((), dtype=dtype).element_size()
    memory = _memory_bytes()
    out = []
    for shape in shapes:
        text = ",".join(map(str, shape))
        size = math.prod(shape) * itemsize
        if memory is not None and size > memory:
            raise ReparamError(f"--input-shape {text} needs {size / 2**30:,.0f} GiB for one input, more than this "
                               f"machine's {memory / 2**30:,.0f} GiB of memory; give a smaller shape")
        try:
            out.append(torch.randn(shape, generator=gen).to(dtype))
        except (RuntimeError, MemoryError) as err:
            raise ReparamError(f"--input-shape {text}: cannot allocate an input of {size / 2**30:,.1f} GiB "
                               f"({type(err).__name__}); give a smaller shape") from err
    return tuple(out)


def _model_dtype(model):
    import torch

    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _example_inputs(loaded, shapes: list[tuple[int, ...]]) -> tuple | None:
    """Random inputs for a PyTorch module: the given shapes, else the library's guess from the first layer."""
    import torch

    if loaded.kind == "module":
        if shapes:
            return _random_inputs(shapes, _model_dtype(loaded.obj))
        from reparam.frontends.fx.capture import example_inputs_for

        return example_inputs_for(loaded.obj)
    if loaded.kind == "exported":
        from reparam.frontends.aten.backend import example_inputs

        gen = torch.Generator().manual_seed(0)
        args, _ = example_inputs(loaded.obj)
        if shapes and [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)] != shapes:
            raise ReparamError(f"the program was exported for input shapes "
                               f"{[list(a.shape) for a in args]}; a .pt2 keeps its own shapes, drop --input-shape")
        return tuple(torch.randn(a.shape, generator=gen).to(a.dtype) if isinstance(a, torch.Tensor)
                     and a.is_floating_point() else a for a in args)
    return None


def _rule_list(rule_files: list[Path] | None, disable: list[str] | None, only: list[str] | None):
    from reparam.core.registry import load_rule_file
    from reparam.frontends.rulesets import select_rules

    extra = [r for f in rule_files or [] for r in load_rule_file(f)]
    return select_rules(None, extra, disable or [], only or None)


_PHASES = {"rewrite": "capturing and rewriting", "verify": "verifying end to end in float64",
           "bisect": "finding the first wrong rewrite", "export": "exporting the fused program again"}


def _fuse(loaded, inputs: tuple | None, shapes: list, rules, verify: bool, tolerance: float | None, steps,
          freeze_inputs: bool = False):
    """Dispatch on the input kind; returns (fused object, Report). ``tolerance`` None: the backend's default."""
    if loaded.kind == "module":
        with steps.phases(_PHASES) as progress:
            fused, rep = _fuse_with(loaded, inputs, shapes, rules, verify, tolerance, progress)
    else:
        label = "capturing, rewriting and verifying" if verify else "capturing and rewriting"
        with steps.step("fuse", label):
            fused, rep = _fuse_with(loaded, inputs, shapes, rules, verify, tolerance, None, freeze_inputs)
    if loaded.kind == "module" and not shapes and inputs is not None:
        guessed = ", ".join(",".join(map(str, t.shape)) for t in inputs)
        rep.notes.append(f"no --input-shape given: guessed the input shape {guessed} from the first layer")
    return fused, rep


def _fuse_with(loaded, inputs, shapes, rules, verify, tolerance, progress, freeze_inputs=False):
    opts = dict(rules=rules, verify=verify, report=True)
    if tolerance is not None:
        opts["tolerance"] = tolerance
    if loaded.kind == "module":
        from reparam.frontends.fx.backend import fuse

        return fuse(loaded.obj, inputs, progress=progress, **opts)
    if loaded.kind == "exported":
        try:
            from reparam.frontends.aten.backend import fuse_exported
        except ImportError as err:
            raise ReparamError(f"fusing .pt2 programs is not available in this installation ({err})") from err
        return fuse_exported(loaded.obj, progress=progress, **opts)
    try:
        from reparam.frontends.onnx.backend import fuse_onnx
    except ImportError as err:
        raise ReparamError(f"fusing ONNX models is not available in this installation ({err}); "
                           f"pip install 'reparam[onnx]'") from err
    return fuse_onnx(loaded.obj, input_shapes=[list(s) for s in shapes] or None, progress=progress,
                     freeze_initializer_inputs=freeze_inputs, **opts)


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _check_outputs(model: str, outputs: list[tuple[str, Path, str]], weights: Path | None,
                   rule_files: list[Path] | None) -> None:
    """Before any work: each (what, path, option) of ``outputs`` can be written, and overwrites neither an
    input nor another output."""
    from reparam.io.saving import check_writable

    inputs = [(Path(model), "the input file")] if input_kind(model) != "factory" else []
    inputs += [(weights, "the --weights file")] if weights is not None else []
    inputs += [(f, "a --rules file") for f in rule_files or []]
    for what, path, option in outputs:
        check_writable(path, what, option)
        for source, label in inputs:
            if _same_file(source, path):
                raise ReparamError(f"the {what} '{path}' is {label}; choose another {what} path")
    for k, (what, path, _) in enumerate(outputs):
        for other_what, other, _ in outputs[:k]:
            if _same_file(path, other):
                raise ReparamError(f"the {what} '{path}' is the {other_what} file; choose another {what} path")


def _json_out(data: Any) -> None:
    from reparam.io.saving import json_text

    print(json_text(data), end="")


def _load(model: str, trust: bool, weights: Path | None, args: list[str] | None, steps):
    from reparam.io.loading import check_finite, check_request, load_model, parse_args

    factory_args = parse_args(args)
    check_request(model, weights, factory_args)  # before anything is read
    with steps.step("load", f"loading {model}"):
        loaded = load_model(model, trust=trust, weights=weights, args=factory_args)
        check_finite(loaded)
    return loaded


def _steps(run: Run, quiet: bool, stages: int):
    from reparam.cli.render import Steps

    run.steps = Steps(_console("stderr"), quiet, stages)
    return run.steps


def _shape_hint(model: str, input_shape) -> bool:
    return not input_shape and input_kind(model) in ("factory", "pickle", "onnx")


def _safe_kind(model: str) -> str | None:
    try:
        return input_kind(model)
    except ReparamError:
        return None


# ---------------------------------------------------------------------------------------------- commands

DynamicOpt = Annotated[str, typer.Option(
    "--dynamic", metavar="DIMS",
    help="Free dimensions of a .pt2/.onnx/.py output written from a PyTorch model: batch (default), spatial "
         "(batch and the dimensions after the channels) or none.")]


@app.command()
def fuse(model: ModelArg,
         output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT", show_default=False,
                                              help="Where to write the fused model: .pt/.pth (torch.save; load "
                                                   "with torch.load(OUT, weights_only=False)), .pt2 "
                                                   "(torch.export), .onnx, or .py (readable source + "
                                                   "OUT.safetensors: loads with torch alone, no unpickling).")],
         input_shape: InputShapeOpt = None,
         tolerance: Annotated[Optional[float], typer.Option(
             "--tolerance", metavar="RTOL", show_default=False,
             help="Largest relative error max|fused − original| / max|original| accepted. Default: 1e-9 for "
                  "PyTorch inputs (float64), 1e-4 for ONNX (float32 onnxruntime).")] = None,
         rules: RulesOpt = None, disable: DisableOpt = None, only: OnlyOpt = None,
         verify: Annotated[bool, typer.Option("--verify/--no-verify",
                                              help="Compare the fused model with the original end to end in "
                                                   "float64 (the default); --no-verify skips it.")] = True,
         dynamic: DynamicOpt = "batch",
         report: Annotated[Optional[Path], typer.Option("--report", metavar="FILE.json", show_default=False,
                                                        help="Also write the JSON report (on failure too, with "
                                                             "the error).")] = None,
         trust: TrustOpt = False, weights: WeightsOpt = None, args: ArgOpt = None,
         freeze_inputs: Annotated[bool, typer.Option(
             "--freeze-inputs", help="ONNX: treat initializers that are also graph inputs (overridable defaults) as "
                                     "constants and remove them from the inputs. Default: they stay inputs.")] = False,
         quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
         as_json: JsonOpt = False, debug: DebugOpt = False):
    """Fuse IN and write the deploy model to OUT (format chosen by OUT's extension).

    Example: reparam fuse model.pt -o deploy.pt --trust

    Exit codes: 0 written; 2 usage or input error; 3 verification failed. On failure OUT is not written.
    """
    run = Run("fuse", as_json, report)
    run.fields.update(input=model, output=str(output))

    def body():
        from reparam.io.saving import (DYNAMIC_CHOICES, atomic_paths, check_written, json_text, write_model)

        fmt = output_format(output)
        run.fields["format"] = fmt
        if dynamic not in DYNAMIC_CHOICES:
            raise ReparamError(f"bad --dynamic '{dynamic}': choose one of {', '.join(DYNAMIC_CHOICES)}")
        extra = companion_paths(output, fmt)
        targets = [("output", output, "-o")] + [("weights output", p, "-o") for p in extra]
        targets += [("report", report, "--report")] if report is not None else []
        _check_outputs(model, targets, weights, rules)
        run.report_checked = report is not None
        if input_kind(model) == "onnx" and fmt != "onnx":
            raise ReparamError(f"an ONNX input can only be written as .onnx, not '{output.suffix}'")
        if tolerance is not None and not tolerance >= 0:  # NaN too
            raise ReparamError(f"--tolerance must be a number ≥ 0, got {tolerance}")
        shapes = [parse_shape(s) for s in input_shape or []]
        chosen = _rule_list(rules, disable, only)
        steps = _steps(run, quiet or as_json, stages=4 + (verify and input_kind(model) in ("factory", "pickle")))
        loaded = _load(model, trust, weights, args, steps)
        inputs = _example_inputs(loaded, shapes)
        if loaded.kind == "module" and inputs is None and fmt != "pt":
            raise ReparamError(f"writing .{fmt} needs example inputs and none could be guessed: pass --input-shape")
        if freeze_inputs and loaded.kind != "onnx":
            raise ReparamError("--freeze-inputs applies to ONNX inputs only")
        fused, rep = _fuse(loaded, inputs, shapes, chosen, verify, tolerance, steps, freeze_inputs)
        run.fields["report"] = rep.to_dict()
        paths = [output] + extra
        with atomic_paths(*paths, *([report] if report is not None else [])) as temps:  # all or nothing
            with steps.step("write", f"writing {output} ({fmt})"):
                written = loaded.packed(fused) if fmt == "pt" else fused  # a checkpoint dict comes back as one
                rep.notes.extend(write_model(written, temps[:len(paths)], fmt, inputs, dynamic))
            with steps.step("check", f"checking the written {output.name}"):
                checked = check_written(fused, temps[:len(paths)], fmt, inputs,
                                        progress=lambda done, total: steps.count(done, total, "checks"))
            run.fields["written"] = {"files": [str(p) for p in paths], "checked": checked}
            run.fields["report"] = rep.to_dict()
            doc = run.document("ok")
            if report is not None:
                Path(temps[-1]).write_text(json_text(doc))
        if as_json:
            _json_out(doc)
        elif not quiet:
            from reparam.cli.render import summary_table

            _show(summary_table(rep, title=f"{model} → {output}", seconds=doc["seconds"]))
            _print_notes(rep)
    _guarded(debug, body, run, shape_hint=_shape_hint(model, input_shape) if _safe_kind(model) else False)


def _print_notes(rep, dry_run: bool = False) -> None:
    for path, why in rep.opaque.items():
        _say(f"opaque: '{path or '<model>'}' was left as is ({why})")
    for note in rep.notes:
        _say(f"note: {note}")
    if rep.refusals and not dry_run:
        _say(f"{len(rep.refusals)} refused match(es); `reparam inspect` lists them")


@app.command()
def inspect(model: ModelArg, input_shape: InputShapeOpt = None, rules: RulesOpt = None,
            disable: DisableOpt = None, only: OnlyOpt = None, trust: TrustOpt = False,
            weights: WeightsOpt = None, args: ArgOpt = None, as_json: JsonOpt = False, debug: DebugOpt = False):
    """Dry run: show the regions, the rules that would fire (and where), the refusals and the op/param
    counts before → after, without verifying or writing anything.

    Example: reparam inspect model.pt --trust -s 1,3,224,224
    """
    run = Run("inspect", as_json)
    run.fields["input"] = model

    def body():
        shapes = [parse_shape(s) for s in input_shape or []]
        chosen = _rule_list(rules, disable, only)
        steps = _steps(run, as_json, stages=2)
        loaded = _load(model, trust, weights, args, steps)
        inputs = _example_inputs(loaded, shapes)
        _, rep = _fuse(loaded, inputs, shapes, chosen, False, None, steps)
        regions = _regions(loaded, inputs, rep)
        if as_json:
            run.fields.update(regions=regions, report=rep.to_dict())
            _json_out(run.document("ok"))
            return
        from reparam.cli.render import fired_table, refusals_table, summary_table

        _say("regions: " + ", ".join(regions))
        _show(fired_table(rep))
        if rep.refusals:
            _show(refusals_table(rep))
        _show(summary_table(rep, title="counts before → after (dry run: not verified, nothing written)",
                            dry_run=True))
        _print_notes(rep, dry_run=True)
    _guarded(debug, body, run, shape_hint=_shape_hint(model, input_shape) if _safe_kind(model) else False)


def _regions(loaded, inputs, rep) -> list[str]:
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
          trust: TrustOpt = False, weights: WeightsOpt = None, args: ArgOpt = None, as_json: JsonOpt = False,
          debug: DebugOpt = False):
    """Time the original model against the fused one (torch eager, CPU): median latency and speed-up.
    The batch size is the first dimension of --input-shape.

    Example: reparam bench examples.repnext:repnext_m1 -s 8,3,224,224 --threads 2
    """
    run = Run("bench", as_json)
    run.fields["input"] = model

    def body():
        import torch

        if input_kind(model) == "onnx":
            raise ReparamError("bench times PyTorch models in eager mode; give a .pt, .pt2 or factory input")
        shapes = [parse_shape(s) for s in input_shape or []]
        chosen = _rule_list(rules, disable, only)
        torch.set_num_threads(threads)
        steps = _steps(run, as_json, stages=3 + verify)
        loaded = _load(model, trust, weights, args, steps)
        inputs = _example_inputs(loaded, shapes)
        if inputs is None:
            raise ReparamError("no input shape could be guessed: pass --input-shape")
        fused, rep = _fuse(loaded, inputs, shapes, chosen, verify, None, steps)
        original = loaded.obj.module() if loaded.kind == "exported" else loaded.obj.eval()
        fused = fused.module() if isinstance(fused, torch.export.ExportedProgram) else fused
        with steps.step("time", f"timing ({warmup} warm-up + {repeat} runs each, {threads} threads)"):
            t_orig, t_fused = _median_latency([original, fused], inputs, warmup, repeat, steps)
        ratio = t_orig / t_fused
        shapes_text = ", ".join("×".join(map(str, t.shape)) for t in inputs if isinstance(t, torch.Tensor))
        v = rep.verification
        if as_json:
            run.fields.update(input_shapes=[list(t.shape) for t in inputs], threads=threads, repeat=repeat,
                              warmup=warmup, median_ms={"original": t_orig * 1e3, "fused": t_fused * 1e3},
                              speedup=ratio, max_error=v.error_fp64, max_error_native=v.error_native,
                              verification=rep.to_dict()["verification"], rules_fired=rep.fired_counts())
            _json_out(run.document("ok"))
            return
        from reparam.cli.render import error_text, fired_text, latency_table

        _say(f"median latency, torch eager, input {shapes_text}, {threads} thread(s), {repeat} runs (interleaved)")
        _show(latency_table([("original", t_orig), ("fused", t_fused)], ratio))
        _say(f"max error: {error_text(rep)}; rules fired: {fired_text(rep)}")
    _guarded(debug, body, run, shape_hint=_shape_hint(model, input_shape) if _safe_kind(model) else False)


def _median_latency(models, inputs: tuple, warmup: int, repeat: int, steps=None) -> list[float]:
    """Median seconds per call for each model, runs interleaved so both see the same machine state."""
    import torch

    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for m in models:
            for _ in range(warmup):
                m(*inputs)
        for k in range(repeat):
            for i, m in enumerate(models):
                t0 = time.perf_counter()
                m(*inputs)
                times[i].append(time.perf_counter() - t0)
            if steps is not None:
                steps.count(k + 1, repeat, "runs")
    return [statistics.median(t) for t in times]


@app.command("rules")
def list_rules(rules: RulesOpt = None, as_json: JsonOpt = False, debug: DebugOpt = False):
    """List the rules in the order they are tried, each with the identity it applies.

    Example: reparam rules --rules my_rules.py
    """
    run = Run("rules", as_json)

    def body():
        from reparam.cli.catalogue import rule_catalogue
        from reparam.core.registry import load_rule_file
        from reparam.frontends.rulesets import select_rules

        extra = [r for f in rules or [] for r in load_rule_file(f)]
        entries = rule_catalogue(select_rules(None, extra))  # checks the names are unique
        if as_json:
            run.fields["rules"] = [{"name": n, "identity": i, "doc": d, "user": k < len(extra)}
                                   for k, (n, i, d) in enumerate(entries)]
            _json_out(run.document("ok"))
            return
        from rich.table import Table

        table = Table(show_edge=False, pad_edge=False)
        table.add_column("#", justify="right")
        table.add_column("rule", style="bold", no_wrap=True)
        table.add_column("identity")
        for k, (name, identity, _) in enumerate(entries, 1):
            table.add_row(str(k), name + (" (user)" if k <= len(extra) else ""), identity)
        _show(table)
    _guarded(debug, body, run)


if __name__ == "__main__":  # pragma: no cover
    main()
