"""Mutation testing: change one thing in the DRO code, run the tests that should notice, and count the kills.

    python scripts/mutation_test.py --mode named      # the mutations of issue 11 (a review's), each must be killed
    python scripts/mutation_test.py --mode generated --output_dir outputs/mutation    # every operator, every line
    python scripts/mutation_test.py --mode generated --previous outputs/mutation/mutants.json ...  # after new tests

`named` applies the hand-written mutations listed in NAMED (a flipped loss sign, weights grouped across questions,
...) and runs the tests that must kill each, the two-process test included. `generated` walks the AST of
estimators.py, selector.py, generator.py, evaluation.py and the trainer's E-step and M-step and makes one mutant per
(node, operator): arithmetic and comparison operators swapped, `and`/`or` swapped, `not` and unary minus dropped,
numeric constants changed, True/False flipped, reductions swapped (sum/mean, max/min, argmax/argmin) and call
statements deleted. Annotations, docstrings and string constants are left alone.

Each mutant is written into a scratch copy of the repository (never into this checkout) and tested in a child
forked from a parent that has already imported torch, transformers and TRL, so a mutant costs only its tests; the
tests stop at the first failure. A mutant survives if its tests pass; it is killed if one fails, or hangs (a test
over `--test_timeout` seconds, or the whole set over 4 × its unmutated time). `mutants.json` (kept current during the
run) and `summary.md` in `--output_dir` list every mutant, its outcome, the first failing test and the survivors.
"""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("dro_rl", "rewards", "tests", "scripts", "configs", "docs", "pyproject.toml")

# The tests each module's mutants run, fastest and most specific first (the run stops at the first failure).
TESTS = {
    "dro_rl/estimators.py": ["tests/test_estimators.py", "tests/test_correctness.py"],
    "dro_rl/selector.py": ["tests/test_selector.py", "tests/test_prompt_budget.py", "tests/test_one_prompt.py",
                           "tests/test_generator.py", "tests/test_properties.py", "tests/test_packed.py",
                           "tests/test_correctness.py::test_the_loss_scores_exactly_what_the_e_step_sampled_with_lora_dropout_on"],
    "dro_rl/generator.py": ["tests/test_generator.py", "tests/test_correctness.py", "tests/test_one_prompt.py"],
    "dro_rl/evaluation.py": ["tests/test_evaluation.py", "tests/test_answer_metrics.py",
                             "tests/test_evaluation_pipeline.py", "tests/test_selector.py",
                             "tests/test_trainer.py::test_evaluation_runs_the_greedy_pipeline_during_training",
                             "tests/test_scripts.py::test_warmup_then_evaluate_on_hotpotqa"],
    "dro_rl/trainer.py": ["tests/test_correctness.py", "tests/test_trainer.py", "tests/test_shared_base.py"],
}
# In trainer.py only the E-step and the M-step are mutated.
TRAINER_FUNCTIONS = ("_generate_and_score_completions", "_compute_loss")
DISTRIBUTED = "tests/test_distributed.py"


@dataclass(frozen=True)
class Named:
    """A hand-written mutation: ``before`` (found exactly once in ``path``) becomes ``after``."""

    name: str
    path: str
    before: str
    after: str
    tests: tuple[str, ...]


NAMED = [
    Named("selector loss with its sign flipped", "dro_rl/estimators.py",
          "    return weighted_nll(adv, ranking_logp, m)", "    return -weighted_nll(adv, ranking_logp, m)",
          ("tests/test_estimators.py", "tests/test_correctness.py")),
    Named("generator loss with its sign flipped", "dro_rl/estimators.py",
          "    return weighted_nll(coef, answer_logp, m)", "    return -weighted_nll(coef, answer_logp, m)",
          ("tests/test_correctness.py",)),
    Named("weights normalised across questions", "dro_rl/trainer.py",
          "E.importance_weights(log_w.view(-1, m), log_ratio)", "E.importance_weights(log_w.view(m, -1).t(), log_ratio)",
          ("tests/test_correctness.py",)),
    Named("advantages shifted to another question", "dro_rl/trainer.py",
          "return adv.reshape(-1), gen_coef.reshape(-1)", "return adv.roll(1, 0).reshape(-1), gen_coef.reshape(-1)",
          ("tests/test_correctness.py",)),
    Named("no division by the gradient-accumulation steps", "dro_rl/trainer.py",
          "        return loss / self.current_gradient_accumulation_steps", "        return loss",
          ("tests/test_correctness.py",)),
    Named("the loss scored at T = 1 while sampling at T != 1", "dro_rl/trainer.py",
          'inputs["allowed"], self.temperature,', 'inputs["allowed"], 1.0,',
          ("tests/test_correctness.py",)),
    Named("importance_logits ignored", "dro_rl/trainer.py",
          'log_w = answer_logp if args.importance_logits == "sum" else answer_logp / n_tokens', "log_w = answer_logp",
          ("tests/test_correctness.py",)),
    Named("the reward slice ignoring the process index", "dro_rl/trainer.py",
          "start = self.accelerator.process_index * len(rows)", "start = 0",
          (DISTRIBUTED,)),
    Named("a per-token-mean generator loss", "dro_rl/trainer.py",
          "                ).sum(-1)  # [B]", "                ).mean(-1)  # [B]",
          ("tests/test_correctness.py",)),
    Named("a constant baseline w + 1/m", "dro_rl/estimators.py",
          "return weights - proposal_weights(log_ratio, m)", "return weights + proposal_weights(log_ratio, m)",
          ("tests/test_estimators.py::test_dro_baseline_keeps_the_expected_gradient_and_lowers_its_variance",)),
    Named("a constant baseline w - 5", "dro_rl/estimators.py",
          "return weights - proposal_weights(log_ratio, m)", "return weights - 5.0",
          ("tests/test_estimators.py::test_dro_baseline_keeps_the_expected_gradient_and_lowers_its_variance",)),
    Named("dropout left on in the E-step", "dro_rl/trainer.py",
          "with eval_mode(self.model, self.generator):", "with nullcontext():",
          ("tests/test_correctness.py",)),
    Named("the sampler drawing at T = 1 while recording log-probs at T", "dro_rl/selector.py",
          "            probs = logprobs.exp()",
          '            probs = torch.softmax(next_logits.float().masked_fill(logits.isneginf(), float("-inf")), -1)',
          ("tests/test_selector.py",)),
    Named("generator_update ignored (always weighted)", "dro_rl/trainer.py",
          "E.generator_coefficients(args.generator_update, weights, log_ratio)",
          'E.generator_coefficients("weighted", weights, log_ratio)', ("tests/test_correctness.py",)),
    Named("without replacement: the unnormalised ratios ρ as the proposal's weights", "dro_rl/estimators.py",
          "else torch.softmax(log_ratio.float(), dim=-1)", "else log_ratio.float().exp()",
          ("tests/test_correctness.py",)),
    Named("without replacement: the entropy bonus as a plain mean over rows", "dro_rl/trainer.py",
          'bonus = (entropy * inputs["sample_share"]).mean()', "bonus = entropy.mean()", ("tests/test_correctness.py",)),
    Named("a generation batch spanning two optimizer steps accepted", "dro_rl/config.py",
          "        if self.gradient_accumulation_steps % self.steps_per_generation:\n            # A generation",
          "        if False:\n            # A generation", ("tests/test_correctness.py",)),
]


@dataclass
class MutationArguments:
    mode: Literal["named", "generated"] = field(default="named", metadata={"help": "Which mutants to run."})
    modules: list[str] = field(default_factory=lambda: list(TESTS),
                               metadata={"help": "Files whose generated mutants run (paths as in TESTS)."})
    sample: int | None = field(default=None, metadata={"help": "Run a random sample of this many generated mutants."})
    seed: int = field(default=0, metadata={"help": "Seed of --sample."})
    previous: str | None = field(
        default=None,
        metadata={"help": "A mutants.json of an earlier run: its killed mutants (same file, line text and change) "
                  "count as killed without running again; the others run (e.g. its survivors, after new tests)."},
    )
    test_timeout: int = field(default=90, metadata={"help": "Seconds one test may run under a generated mutant (named "
                                                             "mutants run the two-process test: 600)."})
    min_timeout: int = field(
        default=60, metadata={"help": "Seconds a mutant's tests may take at least; the limit is 4 × the unmutated run."}
    )
    output_dir: str = field(default="outputs/mutation", metadata={"help": "Where mutants.json and summary.md go."})


# ---------------------------------------------------------------------------------------------------------------
# Generated mutants
# ---------------------------------------------------------------------------------------------------------------

BINOPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
          ast.Mod: ast.Mult, ast.Pow: ast.Mult}
CMPOPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
          ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
REDUCTIONS = {"sum": "mean", "mean": "sum", "max": "min", "min": "max", "argmax": "argmin", "argmin": "argmax",
              "amax": "amin", "amin": "amax", "all": "any", "any": "all"}


@dataclass
class Mutant:
    path: str
    line: int
    operator: str
    description: str
    source: str = field(repr=False)
    code: str = ""  # the original line, stripped: how a mutant is found again after lines move
    occurrence: int = 0  # among mutants with the same path, line text and change (e.g. two 0.0s on one line)

    def key(self) -> tuple[str, str, str, int]:
        return self.path, self.description, self.code, self.occurrence


def _constant_mutation(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return 0 if value == 1 else value + 1
    if isinstance(value, float):
        return 1.0 if value == 0.0 else value * 2
    return None


def _further(value: int | float) -> int | float:
    """The magnitude of a negated constant, moved one step away from zero."""
    return value + 1 if isinstance(value, int) else (value * 2 if value else 1.0)


def _negative_constant(node) -> bool:
    return (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant)
            and _constant_mutation(node.operand.value) is not None and not isinstance(node.operand.value, bool))


class _Sites(ast.NodeVisitor):
    """Every (node, mutation) site, outside annotations, docstrings and strings."""

    def __init__(self, functions: tuple[str, ...] | None):
        self.functions, self.inside, self.sites, self.negated = functions, functions is None, [], set()

    def visit_FunctionDef(self, node):
        was = self.inside
        self.inside = was or (self.functions is not None and node.name in self.functions)
        for stmt in node.body:
            self.visit(stmt)
        self.inside = was

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node):
        if node.value is not None:
            self.visit(node.value)

    def visit_arg(self, node):  # annotations of parameters
        return

    def generic_visit(self, node):
        if self.inside:
            self._collect(node)
        for child in ast.iter_child_nodes(node):
            if _negative_constant(node):
                self.negated.add(id(child))
        super().generic_visit(node)

    def _negated(self, node) -> bool:
        return id(node) in self.negated

    def _collect(self, node):
        if isinstance(node, ast.BinOp) and type(node.op) in BINOPS:
            self.sites.append((node, "binop", f"{type(node.op).__name__} -> {BINOPS[type(node.op)].__name__}"))
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in CMPOPS:
                    self.sites.append((node, f"cmp{i}", f"{type(op).__name__} -> {CMPOPS[type(op)].__name__}"))
        elif isinstance(node, ast.BoolOp):
            self.sites.append((node, "boolop", "and <-> or"))
        elif _negative_constant(node):  # -1 -> -2: another axis or slice end (dropping the sign of a dim of a 2-D
            value = node.operand.value  # tensor would often name the same axis)
            self.sites.append((node, "negative", f"-{value!r} -> -{_further(value)!r}"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            self.sites.append((node, "unary", f"drop {type(node.op).__name__}"))
        elif isinstance(node, ast.Constant) and _constant_mutation(node.value) is not None and not self._negated(node):
            self.sites.append((node, "constant", f"{node.value!r} -> {_constant_mutation(node.value)!r}"))
        elif isinstance(node, ast.Attribute) and node.attr in REDUCTIONS:
            self.sites.append((node, "reduction", f".{node.attr} -> .{REDUCTIONS[node.attr]}"))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            self.sites.append((node, "delete", "call statement deleted"))


class _Apply(ast.NodeTransformer):
    def __init__(self, target, kind: str):
        self.target, self.kind = target, kind

    def visit(self, node):
        if node is not self.target:
            return super().visit(node)
        if self.kind == "binop":
            node.op = BINOPS[type(node.op)]()
        elif self.kind.startswith("cmp"):
            i = int(self.kind[3:])
            node.ops[i] = CMPOPS[type(node.ops[i])]()
        elif self.kind == "boolop":
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        elif self.kind == "negative":
            node.operand.value = _further(node.operand.value)
        elif self.kind == "unary":
            return node.operand
        elif self.kind == "constant":
            node.value = _constant_mutation(node.value)
        elif self.kind == "reduction":
            node.attr = REDUCTIONS[node.attr]
        elif self.kind == "delete":
            return ast.Pass()
        return node


def generated_mutants(path: str) -> Iterator[Mutant]:
    source = (ROOT / path).read_text()
    functions = TRAINER_FUNCTIONS if path.endswith("trainer.py") else None
    sites = _Sites(functions)
    sites.visit(ast.parse(source))
    seen: dict[tuple[str, str], int] = {}
    for index in range(len(sites.sites)):
        tree = ast.parse(source)  # a fresh tree per mutant; the site is found again by its position
        fresh = _Sites(functions)
        fresh.visit(tree)
        node, kind, description = fresh.sites[index]
        mutated = ast.unparse(ast.fix_missing_locations(_Apply(node, kind).visit(tree)))
        code = source.splitlines()[node.lineno - 1].strip()
        seen[(description, code)] = occurrence = seen.get((description, code), -1) + 1
        yield Mutant(path, node.lineno, kind, description, mutated, code, occurrence)


def named_mutants() -> Iterator[tuple[Mutant, tuple[str, ...]]]:
    for named in NAMED:
        source = (ROOT / named.path).read_text()
        if source.count(named.before) != 1:
            raise ValueError(f"named mutation {named.name!r}: {named.before!r} is not found exactly once in "
                             f"{named.path}; update NAMED")
        line = source[: source.index(named.before)].count("\n") + 1
        mutated = source.replace(named.before, named.after)
        yield Mutant(named.path, line, "named", named.name, mutated, named.before.strip()), named.tests


# ---------------------------------------------------------------------------------------------------------------
# Running a mutant: written into the scratch copy, tested in a forked child
# ---------------------------------------------------------------------------------------------------------------


def scratch_copy() -> Path:
    """``<tmp>/repo``: the files the tests need, beside a link to ``../shared`` (tests read ../shared/data)."""
    folder = Path(tempfile.mkdtemp(prefix="dro-mutation-")) / "repo"
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, folder / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, folder / name)
    if (ROOT.parent / "shared").exists():
        os.symlink(ROOT.parent / "shared", folder.parent / "shared")
    return folder


class _FirstFailure:
    """pytest plugin: writes the id of the first failing test to ``path``, and fails a test that runs longer than
    ``per_test`` seconds (a mutant that loops forever, e.g. in the sampler, is killed in seconds, not minutes)."""

    def __init__(self, path: str, per_test: int):
        self.path, self.per_test = path, per_test

    def pytest_runtest_logreport(self, report):
        if report.failed and not os.path.exists(self.path):
            with open(self.path, "w") as f:
                f.write(report.nodeid)

    def _over_time(self, signum, frame):
        raise TimeoutError(f"a test ran over {self.per_test} s: the mutant hangs")

    def pytest_runtest_setup(self, item):
        signal.signal(signal.SIGALRM, self._over_time)
        signal.alarm(self.per_test)

    def pytest_runtest_teardown(self, item):
        signal.alarm(0)


def run_tests(copy: Path, tests: list[str], timeout: float, per_test: int = 90) -> tuple[str, str]:
    """('killed' | 'survived' | 'timeout', the first failing test) for the mutant currently written into ``copy``."""
    failure = copy.parent / "first_failure"
    failure.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # child: import the mutated copy, run pytest, report by exit code
        try:
            os.chdir(copy)
            os.setsid()
            sys.path.insert(0, str(copy))
            os.environ["PYTHONPATH"] = str(copy)
            import pytest

            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            plugin = _FirstFailure(str(failure), per_test)
            code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests], plugins=[plugin])
        except BaseException:
            code = 99
        os._exit(int(code))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            first = failure.read_text() if failure.exists() else ("" if code == 0 else f"exit code {code}")
            return ("survived" if code == 0 else "killed"), first
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "timeout", ""


def main(args: MutationArguments) -> dict:
    # Imported once here and inherited by every forked child (the packages import their submodules lazily).
    import datasets  # noqa: F401
    import hypothesis  # noqa: F401
    import peft  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, Trainer  # noqa: F401
    from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer, TrlParser  # noqa: F401

    if args.mode == "named":
        jobs = list(named_mutants())
    else:
        mutants = [m for path in args.modules for m in generated_mutants(path)]
        if args.sample is not None:
            mutants = random.Random(args.seed).sample(mutants, min(args.sample, len(mutants)))
        jobs = [(m, tuple(TESTS[m.path])) for m in mutants]
    results, carried = [], set()
    if args.previous:
        with open(args.previous) as f:
            carried = {(r["path"], r["description"], r["code"], r["occurrence"]): r for r in json.load(f)
                       if r["outcome"] != "survived"}
    os.makedirs(args.output_dir, exist_ok=True)
    copy = scratch_copy()
    print(f"{len(jobs)} mutants ({sum(m.key() in carried for m, _ in jobs)} killed in {args.previous}); "
          f"scratch copy {copy}", flush=True)
    limits: dict[tuple[str, ...], float] = {}
    try:
        for i, (mutant, tests) in enumerate(jobs, 1):
            if mutant.key() in carried:
                results.append({**carried[mutant.key()], "line": mutant.line, "operator": mutant.operator})
                print(f"[{i}/{len(jobs)}] killed before ({args.previous}) {mutant.path}:{mutant.line} "
                      f"{mutant.description}", flush=True)
                continue
            if tests not in limits:  # the unmutated tests must pass; a mutant may take 4 × as long before it hangs
                start = time.monotonic()
                outcome, failure = run_tests(copy, list(tests), 3600)
                if outcome != "survived":
                    raise RuntimeError(f"the unmutated tests fail ({failure}): fix them before mutation testing")
                limits[tests] = max(args.min_timeout, 4 * (time.monotonic() - start))
            target = copy / mutant.path
            original = target.read_text()
            target.write_text(mutant.source)
            start = time.monotonic()
            try:
                per_test = args.test_timeout if args.mode == "generated" else 600
                outcome, killed_by = run_tests(copy, list(tests), limits[tests], per_test)
            finally:
                target.write_text(original)
            results.append({"path": mutant.path, "line": mutant.line, "code": mutant.code,
                            "occurrence": mutant.occurrence, "operator": mutant.operator,
                            "description": mutant.description, "outcome": outcome, "killed_by": killed_by,
                            "seconds": round(time.monotonic() - start, 1)})
            print(f"[{i}/{len(jobs)}] {outcome:8s} {mutant.path}:{mutant.line} {mutant.description}  {killed_by}",
                  flush=True)
            with open(os.path.join(args.output_dir, "mutants.json"), "w") as f:  # kept current: a long run can stop
                json.dump(results, f, indent=1)
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)
    with open(os.path.join(args.output_dir, "mutants.json"), "w") as f:
        json.dump(results, f, indent=1)
    summary = summarize(results, args)
    with open(os.path.join(args.output_dir, "summary.md"), "w") as f:
        f.write(summary + "\n")
    print("\n" + summary, flush=True)
    return {"results": results, "summary": summary}


def summarize(results: list[dict], args: MutationArguments) -> str:
    lines = [f"Mutation testing ({args.mode}): killed = a test failed or hung.", "",
             "| file | mutants | killed | survived | kill share |", "| --- | ---: | ---: | ---: | ---: |"]
    for path in sorted({r["path"] for r in results}) + ["all"]:
        rows = [r for r in results if path in ("all", r["path"])]
        killed = sum(r["outcome"] != "survived" for r in rows)
        lines.append(f"| {path} | {len(rows)} | {killed} | {len(rows) - killed} | {killed / max(1, len(rows)):.0%} |")
    if args.mode == "named":
        lines += ["", "| mutation | outcome | first failing test |", "| --- | --- | --- |"]
        lines += [f"| {r['description']} | {r['outcome']} | `{r['killed_by']}` |" for r in results]
    survivors = [r for r in results if r["outcome"] == "survived"]
    if survivors:
        lines += ["", "Survivors:", ""]
        lines += [f"- {r['path']}:{r['line']} {r['description']}" for r in survivors]
    return "\n".join(lines)


def make_parser():
    from dro_rl.parser import DROParser

    return DROParser((MutationArguments,))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
