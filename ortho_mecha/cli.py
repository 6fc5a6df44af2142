"""The ``ortho-mecha`` command line.

Every subcommand's arguments are declared here; its work lives in the module of its concept and is
imported only when the command runs, so ``ortho-mecha --help`` stays fast (torch and sd-mecha take
seconds to import). On any failure a command prints one line naming the file and the problem to
stderr and exits with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sqlite3
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from ortho_mecha.arch import ALIASES, ARCH_IDS  # plain data: importing it loads neither torch nor sd-mecha
from ortho_mecha.workflows import DEFAULT_ALPHAS  # plain data as well

EXIT_ERROR = 2
ARCH_CHOICES = [*ARCH_IDS, *ALIASES]  # canonical ids, then the seed tool's aliases


def _lazy(target: str) -> Callable[[argparse.Namespace], int | None]:
    """Return a handler that imports ``module:function`` only when called."""
    module_name, function_name = target.split(":")

    def handler(args: argparse.Namespace) -> int | None:
        return getattr(importlib.import_module(module_name), function_name)(args)

    return handler


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="write a small synthetic model family to DIR (works with no downloads)")
    p.add_argument("dir", help="folder to write the demo models into (created if missing)")
    p.add_argument("--overwrite", action="store_true", help="replace demo files that already exist")
    p.set_defaults(handler=_lazy("ortho_mecha.demo:cli_demo"))


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="the base model (.safetensors) every delta is taken against")
    p.add_argument("models", nargs="+", help="fine-tuned models: .safetensors files, sharded index JSONs or folders")
    p.add_argument(
        "--arch",
        choices=ARCH_CHOICES,
        help="architecture id (default: detected from the base's keys and shapes)",
    )


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check models against a base and report the key mapping")
    _add_model_arguments(p)
    p.add_argument("--json", metavar="REPORT.json", help="also write the validation report as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace REPORT.json if it exists")
    p.set_defaults(handler=_lazy("ortho_mecha.validate:cli_validate"))


def _add_analyse(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyse", aliases=["analyze"], help="one streaming pass: similarity, conflicts, signal, lineage"
    )
    _add_model_arguments(p)
    p.add_argument(
        "--delta-from",
        action="append",
        default=[],
        metavar="MODEL=OTHER",
        help="take MODEL's delta against OTHER instead of the base (repeatable)",
    )
    p.add_argument("--rank-samples", type=int, default=5, metavar="K",
                   help="largest 2-D keys used for the SVD signal (5)")
    p.add_argument("--exact", action="store_true", help="float64 throughout (cosines within 1e-9)")
    p.add_argument("--json", metavar="REPORT.json", help="write the full report as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace REPORT.json if it exists")
    p.add_argument("--no-cache", action="store_true", help="ignore and do not update the analysis cache")
    p.add_argument("--chunk", type=int, default=None, metavar="N", help="elements per streamed chunk (tuning)")
    p.add_argument(
        "--one-thread",
        "--single-process",  # its name while a second process did what the second thread does
        dest="one_thread",
        action="store_true",
        help="reduce a large pass (from 1 GiB) on one thread, not two: slower, leaves a core free",
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="shard the pass over Dask workers: tcp://HOST:PORT, or local:N for N local worker processes",
    )
    p.set_defaults(handler=_lazy("ortho_mecha.analysis:cli_analyse"))


def _add_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="show or clear the analysis cache (location: $ORTHO_MECHA_CACHE)")
    p.add_argument("action", choices=["show", "clear"])
    p.add_argument("--stale", action="store_true",
                   help="with clear: remove only what no analysis can use again (analyses against a base file that is "
                        "gone or has changed since, records of another version of ortho-mecha)")
    p.set_defaults(handler=_lazy("ortho_mecha.cache:cli_cache"))


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="propose a mix from an analysis report: the optimizer's plan with a reason per row")
    p.add_argument("report", help="the analysis report (from `ortho-mecha analyse --json`)")
    p.add_argument("--json", required=True, metavar="PLAN.json", help="the plan to write")
    p.add_argument("--method", default="ortho_superpose", metavar="NAME", help="merge method (ortho_superpose)")
    p.add_argument("--autofill", action="store_true",
                   help="the auto-fill's rows (each model's parent as delta-from, then the redundancy and repeat "
                        "rules) without the optimizer's search over delta-froms")
    p.add_argument("--overwrite", action="store_true", help="replace PLAN.json if it exists")
    p.set_defaults(handler=_lazy("ortho_mecha.optimize:cli_plan"))


def _add_recipe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipe", help="write a plan's sd-mecha recipe (.mecha) and/or a Python script that re-runs it")
    p.add_argument("plan", help="the plan (JSON)")
    p.add_argument("--mecha", metavar="OUT.mecha", help="write the recipe in sd-mecha's .mecha format")
    p.add_argument("--script", metavar="OUT.py", help="write a standalone Python script that merges the recipe")
    p.add_argument("--overwrite", action="store_true", help="replace files that already exist")
    p.set_defaults(handler=_lazy("ortho_mecha.recipe:cli_recipe"))


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge a plan into a .safetensors file (repaired, with recipe and hashes)")
    p.add_argument("plan", help="the plan (JSON)")
    p.add_argument("--out", required=True, metavar="OUT.safetensors", help="the merged model to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="sd-mecha worker threads (default: auto; 0: merge in this thread)")
    p.add_argument("--device", default=None, metavar="DEV", help="merge device: cpu (default), cuda, cuda:1, ...")
    p.add_argument(
        "--dry-run", action="store_true",
        help="check the plan, inputs and output as the merge does and forecast peak RAM, output size, free disk and "
             "time; merge nothing"
    )
    p.add_argument(
        "--no-survival",
        action="store_true",
        help="skip measuring each row's survival in the output (one more read of the inputs, cached ones excepted)",
    )
    p.set_defaults(handler=_lazy("ortho_mecha.merge:cli_merge"))


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="write a sharded or scaled-fp8 model as one plain .safetensors file that merge (sd-mecha) can read",
    )
    p.add_argument("model", help="the model: a .safetensors file, a shard or its index JSON")
    p.add_argument("--out", required=True, metavar="OUT.safetensors", help="the single-file copy to write")
    p.add_argument(
        "--dtype",
        choices=["keep", "fp32", "fp16", "bf16"],
        default="keep",
        help="float tensors' dtype (default keep: as stored; scaled fp8 weights become bf16)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(handler=_lazy("ortho_mecha.merge:cli_convert"))


def _add_preview(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preview",
        help="render a model through a running ComfyUI and save the images (or sweep a plan's alpha)",
        description="Render MODEL through ComfyUI, or with --plan and --alphas merge the plan at each global alpha, "
        "preview every merge with the same seed and save an XY grid beside the merges.",
    )
    p.add_argument("model", nargs="?", help="the model (.safetensors) to preview (not with --plan)")
    p.add_argument("--plan", metavar="PLAN.json", help="alpha sweep: the plan to merge at each of --alphas")
    p.add_argument("--alphas", metavar="A,B,...", help=f"sweep: global alphas (default {DEFAULT_ALPHAS})")
    p.add_argument("--compare", action="store_true", help="sweep: also preview the base and each enabled row's model")
    p.add_argument(
        "--arch",
        choices=ARCH_CHOICES,
        help="architecture id: picks the built-in workflow (default: detected from the model's keys, or from the "
        "plan's base; custom needs --workflow)",
    )
    p.add_argument("--prompt", required=True, help="the positive prompt")
    p.add_argument("--negative", help="the negative prompt (default: empty; with --workflow, the workflow's own)")
    p.add_argument("--seed", type=int, help="noise seed (default 0, so previews of different merges compare; with "
                   "--workflow, the workflow's own)")
    p.add_argument("--workflow", metavar="FILE.json",
                   help='your own workflow, exported from ComfyUI with "Save (API)" (or an image ComfyUI saved, '
                        "which holds the workflow that made it)")
    for role, example in (("model", "4.unet_name"), ("prompt", "6.text"), ("negative", "7.text"), ("seed", "3.seed")):
        p.add_argument(
            f"--set-{role}",
            metavar="NODE.INPUT",
            help=f"with --workflow: the input that takes the {role} (e.g. {example}; default: detected)"
            + ("" if role == "model" else "; several, comma-separated, all take it (a refiner's too)"),
        )
    p.add_argument("--steps", type=int, help="sampling steps (default: the architecture's template)")
    p.add_argument("--cfg", type=float, help="CFG scale (default: the architecture's template)")
    p.add_argument("--size", metavar="WxH", help="image size, e.g. 1024x1024 (default: the architecture's template)")
    p.add_argument(
        "--clip", action="append", metavar="NAME", help="text encoder file as ComfyUI lists it (twice for Flux.1)"
    )
    p.add_argument("--vae", metavar="NAME", help="VAE file as ComfyUI lists it")
    p.add_argument("--api", metavar="URL", help="ComfyUI address (default: $COMFYUI_API or http://127.0.0.1:8188)")
    p.add_argument("--comfy-dir", metavar="DIR", help="ComfyUI's folder, to link the model in (default: $COMFYUI_DIR)")
    p.add_argument("--keep-link", action="store_true", help="leave the model linked in ComfyUI's folder afterwards")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="give up after S seconds (default 600)")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="folder for the images (and a sweep's merges); never overwritten"
    )
    p.set_defaults(handler=_lazy("ortho_mecha.comfy:cli_preview"))


def _add_extract_lora(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract-lora", help="write MERGED − BASE as a kohya LoRA (truncated SVD per matrix key)")
    p.add_argument("merged", help="the merged (or fine-tuned) model (.safetensors)")
    p.add_argument("base", help="the base model it was made from (.safetensors)")
    p.add_argument("--rank", type=int, required=True, metavar="R", help="LoRA rank (clamped per key to min(out, in))")
    p.add_argument("--out", required=True, metavar="LORA.safetensors", help="the LoRA to write")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="LoRA dtype (default fp16)")
    p.add_argument("--json", metavar="REPORT.json", help="also write the per-key report as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace LORA (and REPORT) if they exist")
    p.set_defaults(handler=_lazy("ortho_mecha.lora:cli_extract_lora"))


def _add_compress(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="shared-base compression: W_m ≈ base + λ_m·δW (+ κ_m·δQ), one LoRA per model")
    p.add_argument("--base", required=True, metavar="BASE", help="the base model (.safetensors), or 'average'")
    p.add_argument("models", nargs="+", help="the models: .safetensors files, sharded index JSONs or folders")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="folder for the shared base and LoRAs (never overwritten)"
    )
    p.add_argument("--directions", type=int, choices=[1, 2], default=1, help="shared directions per key (default 1)")
    p.add_argument("--rank", type=int, default=64, metavar="R", help="rank of each model's LoRA (default 64)")
    p.add_argument("--rounds", type=int, default=3, metavar="N", help="alternating least-squares rounds per key (3)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="LoRA dtype (default fp16)")
    p.add_argument("--json", metavar="REPORT.json", help="also write the fit report as JSON (never overwritten)")
    p.set_defaults(handler=_lazy("ortho_mecha.compress:cli_compress"))


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo,
    _add_validate,
    _add_analyse,
    _add_cache,
    _add_plan,
    _add_recipe,
    _add_merge,
    _add_convert,
    _add_preview,
    _add_extract_lora,
    _add_compress,
]


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake said in one line like every other error (the full usage: ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ortho-mecha",
        description="Analyse, plan and merge diffusion models with delta-aware orthogonal methods.",
    )
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for command in set(sub.choices.values()):  # also after the command; absent, it leaves the first's value
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show a traceback on errors, and every library's log")
    parser.set_defaults(debug=False)
    parser.commands = sub.choices  # type: ignore[attr-defined]  # name (aliases too) → its parser
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, with a command's options also between its models
    (``analyse --base B a.safetensors --delta-from a.safetensors=x.safetensors b.safetensors``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extras = parser.parse_known_args(argv)
    command = getattr(args, "command", None)
    if extras and command is not None:
        top = argparse.Namespace(debug=args.debug, version=args.version, command=command)
        try:
            return parser.commands[command].parse_intermixed_args(argv[argv.index(command) + 1:], top)
        except TypeError:  # a command argparse cannot intermix: its usual error below
            pass
    return parser.parse_args(argv)


class _OwnRecords(logging.Filter):
    """Lets ortho-mecha's records through, and other libraries' errors (sd-mecha logs warnings of its own
    about keys and memory on the root logger, which ortho-mecha reports in its own words)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] == "ortho_mecha" or record.levelno >= logging.ERROR


def _configure_logging(debug: bool) -> None:
    """One stderr handler on the root logger: warnings as ``ortho-mecha: warning: …``; everything with ``debug``."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("ortho-mecha: %(levelname)s: %(message)s" if not debug else
                                           "%(levelname)s %(name)s: %(message)s"))
    if not debug:
        handler.addFilter(_OwnRecords())
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not getattr(h, "ortho_mecha", False)]
    handler.ortho_mecha = True  # type: ignore[attr-defined]  # replaced, not stacked, by a second main()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool its pipe's reader left


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, systemd, a CI runner) raised as an interrupt, so that what Ctrl-C cleans up (a half
    output, a prompt still running in ComfyUI, a model linked into its folder) is cleaned up here too."""


def _first_signal(signum: int, frame: object) -> NoReturn:
    """Raise the first Ctrl-C (KeyboardInterrupt) or SIGTERM (:class:`Terminated`), and have the process ignore both
    from then on: while the interrupt unwinds, the merge's threads finish their keys (a few seconds), and a second
    Ctrl-C in that wait aborted the process (SIGABRT, "terminate called without an active exception", 2 of 5 tries)
    or printed a traceback (QA10); a Python handler that merely returns did not prevent it, an ignored signal does.
    The half output is removed by the first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_arguments(parser, argv)
    if args.version:
        from ortho_mecha import __version__

        print(__version__)
        return 0
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_ERROR
    _configure_logging(args.debug)
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return _run(args)
    previous = {number: signal.signal(number, _first_signal) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(args)
    finally:
        for number, before in previous.items():
            signal.signal(number, before)


def _run(args: argparse.Namespace) -> int:
    """The command's handler, its failures turned into one line and an exit status."""
    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:  # the reader went away (``… | head``): quiet, with the status of a SIGPIPE'd tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (:class:`Terminated`): the shell's 128 + signal
        terminated = isinstance(interrupt, Terminated)
        print(f"ortho-mecha: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except sqlite3.DatabaseError as exc:  # the cache's database went bad while in use: say which, and the remedy
        from ortho_mecha.cache import CacheUnusable

        if args.debug:
            traceback.print_exc()
        else:
            print(f"ortho-mecha: error: {CacheUnusable(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # one line for the user, the traceback only on request
        if args.debug:
            traceback.print_exc()
        else:
            message = " ".join(str(exc).split()) or type(exc).__name__
            print(f"ortho-mecha: error: {message}", file=sys.stderr)
        return EXIT_ERROR


def console() -> NoReturn:
    """The ``ortho-mecha`` command (and ``python -m ortho_mecha``): :func:`main`, then exit with its status. After
    an interrupt, signals are ignored while Python waits for the merge's threads at exit (see :func:`_first_signal`);
    :func:`main` itself, which tests and scripts call in-process, leaves the handlers as it found them."""
    status = main()
    if status in (128 + signal.SIGINT, 128 + signal.SIGTERM) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(status)


if __name__ == "__main__":
    console()
