"""The ``dro-rl`` command, on the conventions of TRL's ``trl`` command.

    dro-rl train --config configs/demo.yaml --max_steps 100 --num_processes 2 --accelerate_config ddp
    dro-rl retrieve --questions q.jsonl --output ranked.jsonl
    dro-rl warmup --data ranked.jsonl --role generator --output_dir warm/generator
    dro-rl evaluate --run_dir outputs/demo --datasets dev.jsonl
    dro-rl predict --run_dir outputs/demo --input questions.jsonl

Each subcommand runs the script of that job in ``scripts/`` with the same flags (``--config`` YAML included), so
``dro-rl evaluate ...`` and ``python scripts/evaluate.py ...`` are one code path. The training commands (``train``,
``warmup``) go through ``accelerate launch``, as ``trl grpo`` and ``trl sft`` do: flags their script does not know
(``--num_processes 2``, ``--accelerate_config <file, or a name in configs/accelerate/ or TRL's>``) go to accelerate.
Their exit status is the script's: 1 for a refusal (one line per process, then one naming the processes that failed,
with no launcher traceback; 2 for an unknown flag, as argparse's), 130 after Ctrl-C and 143 after SIGTERM (128 + the signal's number; ``train`` then says
how to resume). The scripts sit beside the package, so the command works from a source checkout (``pip install -e .``).
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import subprocess
import sys
from argparse import ArgumentParser
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS, ACCELERATE_CONFIGS = ROOT / "scripts", ROOT / "configs" / "accelerate"


class Command(NamedTuple):
    script: str
    help: str
    launched: bool  # through `accelerate launch` (training), or run in this process
    after_interrupt: str = ""  # what to do after Ctrl-C, said last


COMMANDS = {
    "train": Command("train_rl.py", "Train a selector and a generator with DRO (default: the demo)", True,
                     "the same command with --resume_from_checkpoint true reuses the finished stages and continues "
                     "DRO from its newest complete checkpoint"),
    "retrieve": Command("retrieve.py", "Rank each question's candidates, or retrieve them from a corpus", False),
    "warmup": Command("warmup_sft.py", "Warm-up SFT of the selector or the generator", True),
    "evaluate": Command("evaluate.py", "Evaluate retrieval order, selector and oracle picks on datasets", False),
    "predict": Command("predict.py", "Answer new questions with a trained run", False),
}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="dro-rl", allow_abbrev=False)
    subparsers = parser.add_subparsers(help="available commands", dest="command")
    for name, command in COMMANDS.items():
        subparsers.add_parser(name, help=command.help, add_help=False)  # the script prints its own --help
    argv = list(sys.argv[1:] if argv is None else argv)
    args, _ = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    command, rest = COMMANDS[args.command], argv[argv.index(args.command) + 1:]
    script = SCRIPTS / command.script
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: `dro-rl {args.command}` runs the scripts of a source checkout "
                                "of dro-rl (install it with `pip install -e .`)")
    if command.launched:
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        prog = f"dro-rl {args.command}"
        if {"-h", "--help"} & set(rest):  # the script's parser prints the rest; it knows nothing of accelerate's
            print(f"{prog} also takes accelerate launch's flags: --num_processes N, --accelerate_config <file, or "
                  f"{', '.join(sorted(p.stem for p in ACCELERATE_CONFIGS.glob('*.yaml')))} or a TRL name>, "
                  "--mixed_precision, --gpu_ids, --main_process_port, ... (all: accelerate launch --help). "
                  f"{command.script}'s settings:", flush=True)
        try:
            with refusals_in_one_line(prog, command.after_interrupt):  # an accelerate config that cannot run here
                launch(script, rest)
        except subprocess.CalledProcessError as err:  # the script has printed why; accelerate's traceback adds nothing
            return err.returncode
        except ChildFailedError as err:  # the same, from torch elastic's launcher of several processes
            line, status = failed_processes(err)
            print(f"{prog}: {line}", file=sys.stderr)
            return status
        except SignalException as err:  # Ctrl-C or SIGTERM to that launcher: it has stopped the processes
            print(interrupted(prog, command.after_interrupt), file=sys.stderr)
            return 128 + err.sigval
    else:
        run(script, rest)
    return 0


# The command-line parsers (TRL's, transformers' and ours): their errors are about the flags or the --config YAML
# a user gave.
PARSER_FILES = ("trl/scripts/_hf_argparser.py", "trl/scripts/utils.py", "transformers/hf_argparser.py",
                "dro_rl/parser.py")
# The config classes DROConfig extends: what their __post_init__ refuses is a setting, not a library failure.
CONFIG_FILES = ("trl/trainer/grpo_config.py", "transformers/training_args.py")


@contextmanager
def refusals_in_one_line(prog: str, after_interrupt: str = "") -> Iterator[None]:
    """Print a refusal raised by this project's own code — a missing file, a malformed row, a setting it cannot
    honour — or by the config classes it extends (TRL's ``GRPOConfig``, transformers' ``TrainingArguments``) as one
    line, ``prog: error: <message>``, and exit with status 1; an unknown flag or YAML key, refused by the
    command-line parser, the same way with status 2 (argparse's, as for a bad flag value); Ctrl-C as ``prog:
    interrupted`` on a line of its own (a progress bar may hold the cursor) with status 130, followed by
    ``after_interrupt`` (e.g. how to resume); every result is written atomically, so nothing half-written is left.

    The message already names the file, row and field; a traceback above it only buries it (and is printed once per
    process under ``accelerate launch``). Errors raised inside a library (torch, transformers, ...) keep their
    traceback, since there the frames are the information; ``DRO_RL_TRACEBACK=1`` keeps it for every error.
    """
    keep_traceback = os.environ.get("DRO_RL_TRACEBACK") == "1"
    try:
        yield
    except KeyboardInterrupt:
        if keep_traceback:
            raise
        print(interrupted(prog, after_interrupt), file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as err:
        frame = err.__traceback__
        while frame.tb_next is not None:
            frame = frame.tb_next
        where = Path(frame.tb_frame.f_code.co_filename).resolve()
        raised_here = any(where.is_relative_to(ROOT / folder) for folder in ("dro_rl", "scripts", "rewards"))
        from_parser = where.as_posix().endswith(PARSER_FILES)
        from_config = where.as_posix().endswith(CONFIG_FILES)
        if keep_traceback or not (raised_here or from_parser or from_config):
            raise
        print(f"{prog}: error: {err}" + (" (see --help)" if from_parser else ""), file=sys.stderr)
        sys.exit(2 if from_parser else 1)


def interrupted(prog: str, after_interrupt: str) -> str:
    """The line said after Ctrl-C, on a line of its own: a progress bar may hold the cursor."""
    return f"\n{prog}: interrupted" + (f"; {after_interrupt}" if after_interrupt else "")


def failed_processes(err) -> tuple[str, int]:
    """``(line, status)`` for a ChildFailedError of torch elastic's launcher, whose failed processes have each printed
    why: the ranks that exited with a status failed, and the launcher then stopped the others with a signal (their
    timestamps do not say which came first); when every one ended by a signal, those are the failures. The status is
    the first failure's (a signal's as a shell gives it, 128 + its number)."""
    exited = {rank: f for rank, f in err.failures.items() if f.exitcode >= 0}
    failed = exited or err.failures
    groups: dict[tuple[bool, str], list[str]] = {}
    for rank, failure in sorted(err.failures.items(), key=lambda item: (item[0] not in failed, item[0])):
        end = f"exit status {failure.exitcode}" if failure.exitcode >= 0 else f"signal {failure.signal_name()}"
        groups.setdefault((rank in failed, end), []).append(str(rank))
    first = min(failed.values(), key=lambda f: f.timestamp).exitcode
    return ("; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)} {'failed' if hit else 'ended'} ({end})"
                      for (hit, end), ranks in groups.items()), first if first >= 0 else 128 - first)


def run(script: Path, args: list[str]) -> None:
    """Run ``script`` as ``python script args`` does, in this process."""
    saved = sys.argv
    sys.argv = [str(script), *args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved


def launch(script: Path, args: list[str]) -> None:
    """``accelerate launch [accelerate flags] script [script flags]``, the flags told apart by the script's parser."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument
    from trl.cli.commands.training import _subtract_subsequence

    from .parser import refuse_unknown_arguments

    parser = load_script(script).make_parser()
    # Only told apart here, not checked: the launched script parses and validates (and may add a default --config).
    script_only, config_rest = list(args), []
    if "--config" in script_only[:-1]:
        at = script_only.index("--config")
        with open(script_only[at + 1]) as f:
            config = {k: v for k, v in (yaml.safe_load(f) or {}).items() if k != "env"}
        config_rest = parser.set_defaults_with_config(**config)
        del script_only[at: at + 2]
    cli_rest = parser.parse_known_args(script_only)[1]
    launch_args = config_rest + cli_rest
    if "--accelerate_config" in launch_args[:-1]:  # a name of ours first, then TRL's names and file paths
        i = launch_args.index("--accelerate_config") + 1
        ours = ACCELERATE_CONFIGS / f"{launch_args[i]}.yaml"
        if not Path(launch_args[i]).is_file() and ours.is_file():
            launch_args[i] = str(ours)
        try:
            launch_args = resolve_accelerate_config_argument(launch_args)
        except ValueError:
            raise ValueError(f"--accelerate_config {launch_args[i]}: neither a file nor a config name (ours: "
                             f"{', '.join(sorted(p.stem for p in ACCELERATE_CONFIGS.glob('*.yaml')))}; or TRL's)") from None
    script_args = _subtract_subsequence(args, cli_rest)
    launcher = launch_command_parser()
    known = {flag for parsers in (launcher, parser) for a in parsers._actions for flag in a.option_strings}
    known.add("--accelerate_config")  # TRL's, resolved above
    # neither the script's nor accelerate's: accelerate's refusal printed its whole usage, and no hint
    refuse_unknown_arguments([word for word in cli_rest if word.startswith("--") and word.split("=")[0] not in known],
                             list(known), f"unknown arguments (neither {script.name}'s settings nor accelerate "
                             "launch's flags)")
    parsed = launcher.parse_args([*launch_args, str(script), *script_args])
    modes = (parsed.multi_gpu, parsed.use_deepspeed, parsed.use_fsdp, parsed.use_megatron_lm, parsed.tpu,
             parsed.config_file)
    import torch

    if parsed.num_processes is not None and parsed.num_processes < 1:  # accelerate ran one process without a word
        raise ValueError(f"--num_processes must be >= 1, got {parsed.num_processes}")
    if parsed.config_file and not torch.cuda.is_available():
        config = refuse_gpu_config(parsed.config_file)
        if config.get("distributed_type") == "MULTI_CPU":  # accelerate ran such a config as ONE process here too
            parsed.num_processes = parsed.num_processes or int(config.get("num_processes") or 1)
            modes = ()
    if (parsed.num_processes or 1) > 1 and not any(modes) and not torch.cuda.is_available():
        # accelerate starts ONE process for `--num_processes 2` when it finds no GPU and is given no launch mode;
        # its multi-process launcher (`--multi_gpu`, by name) runs the processes on the CPU with gloo, once they are
        # told so (ACCELERATE_USE_CPU, which transformers reads; accelerate refuses `--cpu` beside `--multi_gpu`):
        # without it, or use_cpu, each process found no GPU and trained on its own, all in one folder.
        parsed.multi_gpu = True
        os.environ["ACCELERATE_USE_CPU"] = "true"  # the processes inherit this process's environment
    launch_command(parsed)


def load_script(script: Path):
    """A script of ``scripts/`` as a module (not run as ``__main__``), registered in ``sys.modules`` so that its
    dataclasses' postponed annotations resolve when the parser reads them."""
    name = f"dro_rl_{script.stem}"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def refuse_gpu_config(config_file: str) -> dict:
    """An accelerate config for GPUs on a machine without one: accelerate would start its processes on the CPU
    anyway, as plain DDP (an FSDP config's sharding and bf16 silently dropped). Returns the config."""
    with open(config_file) as f:
        config = yaml.safe_load(f) or {}
    kind = str(config.get("distributed_type", "NO"))
    if not config.get("use_cpu") and (kind not in ("NO", "MULTI_CPU") or config.get("mixed_precision") == "bf16"):
        shape = "one process" if kind == "NO" else f"{kind}, {config.get('num_processes', 1)} processes"
        if config.get("mixed_precision") not in (None, "no"):
            shape += f", {config['mixed_precision']}"
        raise ValueError(f"{config_file} is an accelerate config for GPUs ({shape}), and this machine has no CUDA "
                         "GPU: on a CPU, run several processes with "
                         "--num_processes N and no --accelerate_config (no FSDP or mixed precision there)")
    return config


if __name__ == "__main__":
    raise SystemExit(main())
