"""``DROParser``: TRL's parser (YAML ``--config`` plus flags, strict) with a ``--help`` that puts DRO first, and
refusals that name the nearest setting. Every script of the project parses with it.

DROConfig inherits some two hundred fields from GRPOConfig and TrainingArguments. ``--help`` lists DRO's own fields
and the pipeline's first, then the inherited ones, and marks the inherited GRPO settings DRO does not use (they are
refused unless left at their defaults; see ``dro_rl.config.UNUSED_GRPO_SETTINGS``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import sys
from typing import get_args, get_type_hints

from trl import GRPOConfig, TrlParser

from .config import DROConfig, unused_grpo_setting

NOT_USED = "[not used by DRO: refused unless left at its default] "


def refuse_repeated_keys(path: str) -> None:
    """Refuse a YAML file in which a mapping (the top level or a nested one) gives a key more than once, naming the
    key and its lines."""
    import yaml

    with open(path, encoding="utf-8") as f:
        root = yaml.compose(f)
    repeated, nodes = [], [("", root)]
    while nodes:  # every mapping, nested ones included (lr_scheduler_kwargs: {foo: 1, foo: 2})
        prefix, node = nodes.pop()
        if isinstance(node, yaml.SequenceNode):
            nodes += [(prefix, item) for item in node.value]
        if not isinstance(node, yaml.MappingNode):
            continue
        lines: dict[str, list[int]] = {}
        for key, value in node.value:
            lines.setdefault(str(key.value), []).append(key.start_mark.line + 1)
            nodes.append((f"{prefix}{key.value}.", value))
        repeated += [f"{prefix}{key} (lines {', '.join(map(str, at))})" for key, at in lines.items() if len(at) > 1]
    if repeated:
        raise ValueError(f"the --config file {path} gives a setting more than once: {'; '.join(repeated)} — YAML "
                         "would keep the last in silence; keep one")


def refuse_unknown_arguments(words: list[str], known: list[str], what: str = "unknown arguments") -> None:
    """Refuse command-line words no parser took, with the nearest known flag for each misspelt one (a parser's
    refusal: ``refusals_in_one_line`` ends it with status 2, as argparse's own)."""
    if words:
        flags = sorted(flag for flag in known if flag.startswith("--"))
        hints = [f"{match[0]} for {word}" for word in words if word.startswith("--")
                 for match in [difflib.get_close_matches(word.split("=")[0], flags, 1)] if match]
        raise ValueError(f"{what}: {' '.join(words)}" + (f"; did you mean {', '.join(hints)}?" if hints else ""))


class DROParser(TrlParser):
    def __init__(self, dataclass_types=None, **kwargs):
        """TRL reads ``--config`` before argparse sees the flags, so ``--help`` listed no such flag: said here."""
        kwargs.setdefault("epilog", "--config FILE.yaml: settings from a YAML file (the same names as the flags "
                                    "above; a flag given beside it wins).")
        super().__init__(dataclass_types, **kwargs)

    def format_usage(self) -> str:
        """The one usage line an error prints above itself (argparse's would list every one of the ~250 flags)."""
        return f"usage: {self.prog} [--config FILE.yaml] [--<setting> VALUE ...]   (every setting: --help)\n"

    def parse_args_and_config(self, args=None, return_remaining_strings: bool = False, **kwargs):
        """TRL's; a ``--config`` file that is not YAML is refused in one line naming its line and column (PyYAML's
        error is no ValueError, so it came with a traceback), and so is one that gives a setting twice (PyYAML keeps
        the later value without a word: an edited recipe would run with the value its reader did not see). An
        unknown flag is refused with the nearest setting's name, as an unknown YAML key is."""
        import yaml

        argv = list(sys.argv[1:] if args is None else args)
        paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
        try:
            for path in paths:
                if os.path.isfile(path):
                    refuse_repeated_keys(path)
            output = super().parse_args_and_config(args, return_remaining_strings=True, **kwargs)
        except yaml.YAMLError as err:
            raise ValueError(f"the --config file is not valid YAML: {' '.join(str(err).split())}") from None
        if return_remaining_strings:
            return output
        refuse_unknown_arguments(output[-1], [flag for action in self._actions for flag in action.option_strings])
        return output[:-1]

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        """The YAML file's settings as defaults. Refused here, by name: a key that is no setting (with the nearest
        setting; TRL's own message, raised later, tells a developer to edit the dataclass), and an integer setting
        given as a string, which argparse would convert without a word; a strategy written as a bare ``no`` is read
        as the strategy "no". Not a float setting: PyYAML reads ``1e-5``,
        without a dot, as a string, and argparse's ``float()`` is what makes that common spelling work."""
        for key in ("save_strategy", "eval_strategy", "logging_strategy"):
            if kwargs.get(key) is False:  # YAML 1.1 reads a bare `no` as false: the strategy "no" was meant
                kwargs[key] = "no"
        if kwargs.get("report_to") is False:  # `report_to: no`: no integration, "none"
            kwargs["report_to"] = "none"
        integers = {name for dtype in self.dataclass_types for name, hint in get_type_hints(dtype).items()
                    if set(get_args(hint) or [hint]) - {type(None)} == {int}}
        quoted = [f"{key}: {value!r}" for key, value in kwargs.items() if isinstance(value, str) and key in integers]
        if quoted:
            raise ValueError(f"the --config file gives integers as strings: {', '.join(quoted)}; write them unquoted")
        unknown = [s.removeprefix("--") for s in super().set_defaults_with_config(**kwargs) if s.startswith("--")]
        if unknown:
            known = [a.dest for a in self._actions]
            named = [key + "".join(f" (did you mean {m}?)" for m in difflib.get_close_matches(key, known, 1))
                     for key in unknown]
            raise ValueError(f"the --config file holds {len(unknown)} unknown setting(s): {', '.join(named)}")
        return []

    def _add_dataclass_arguments(self, dtype) -> None:
        if not (isinstance(dtype, type) and issubclass(dtype, DROConfig)):
            return super()._add_dataclass_arguments(dtype)
        hints = get_type_hints(dtype)
        # Declared again by DROConfig (a changed default, or DRO's meaning of a TRL setting): listed with DRO's own.
        inherited = {f.name for f in dataclasses.fields(GRPOConfig)} - set(DROConfig.__annotations__)
        own = self.add_argument_group("DRO settings (DROConfig, with the pipeline's PipelineConfig)")
        rest = self.add_argument_group("Inherited from GRPOConfig and TrainingArguments")
        fields = [f for f in dataclasses.fields(dtype) if f.init]
        for group, chosen in ((own, [f for f in fields if f.name not in inherited]),
                              (rest, [f for f in fields if f.name in inherited])):
            for f in chosen:
                f = copy.copy(f)
                f.type = hints[f.name]
                if unused_grpo_setting(f.name):
                    f.metadata = {**f.metadata, "help": NOT_USED + f.metadata.get("help", "")}
                self._parse_dataclass_field(group, f)
