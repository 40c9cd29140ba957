"""What the OpInfo sweeps (test_opinfo_sweep.py, test_opinfo_vjp.py, test_opinfo_jvp.py) share.

A sweep file describes itself with a Sweep (its modes, what it runs on one sample, thresholds,
xfail dicts, report text) and gets its `sweep` fixture and its two tests from define_tests.
Here: the loop over op_db (skips, sample collection, random-op detection, classification), the
comparison of outputs, the markdown report and the tests. What runs on a sample stays in the file.

Results: {mode: {op name: (status, [(sample status, detail)], reason)}}. A sample's status is one
of Sweep.correct, 'failure', or 'oracle' (torch.func cannot run it: not counted); an op's status
is 'failure' if any sample failed, else the worst of Sweep.correct its samples reached, or
'skipped'.
"""

import collections
import dataclasses
import os
import time
import warnings
import zlib
from collections.abc import Callable

import pytest
import torch
from torch.testing._internal.common_methods_invocations import op_db
from torch.utils._pytree import tree_flatten, tree_unflatten

import functorch_lite as ft


def op_name(op):
    return op.name + ("." + op.variant_test_name if op.variant_test_name else "")


def is_diff(t):
    return (
        isinstance(t, torch.Tensor)
        and t.layout == torch.strided
        and (t.is_floating_point() or t.is_complex())
    )


def close(a, b, rtol, atol):
    """None if a and b (pytrees) match, else what differs first."""
    fa, sa = tree_flatten(a)
    fb, sb = tree_flatten(b)
    if sa != sb:
        return f"output structure {sa} != {sb}"
    for i, (x, y) in enumerate(zip(fa, fb)):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return f"output {i}: {type(x).__name__} vs {type(y).__name__}"
        if not isinstance(x, torch.Tensor):
            if x != y:
                return f"output {i}: {x!r} != {y!r}"
            continue
        if ft._C._wrapper_info(x) is not None:
            return f"output {i}: a functorch_lite wrapper escaped"
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"output {i}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"
        if x.layout != y.layout:
            return f"output {i}: layout {x.layout} vs {y.layout}"
        if x.layout != torch.strided:  # e.g. to_sparse's output: allclose wants strided tensors
            x, y = x.to_dense(), y.to_dense()
        if not torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True):
            # in double: bool tensors cannot be subtracted; nan_to_num: a nan on both sides is
            # equal (equal_nan) and must not hide the real difference
            diff = (x.double() - y.double()).abs()
            return f"output {i}: values differ (max abs diff {diff.nan_to_num(0).max().item():.3g})"
    return None


def stack_rows(rows):
    """The outputs of a for-loop, one per batch element, stacked as vmap would return them
    (non-tensor outputs are the same in every row: vmap returns them once)."""
    leaves = list(zip(*[tree_flatten(r)[0] for r in rows]))
    return tree_unflatten(
        [torch.stack(ls) if isinstance(ls[0], torch.Tensor) else ls[0] for ls in leaves],
        tree_flatten(rows[0])[1],
    )


def loop_agrees(actual, rows, close_fn):
    """Whether actual matches the for-loop whose outputs rows() lists. torch.func is wrong now
    and then (e.g. argmax(keepdim=True) with dim=None); the for-loop, which is vmap's definition,
    breaks the tie. A loop that cannot run decides nothing."""
    try:
        return close_fn(actual, stack_rows(rows())) is None
    except Exception:  # noqa: BLE001
        return False


def random_reason(op, sample, close_fn, one_reason=None):
    """Why op's output on sample cannot be compared with an oracle's, or None. one_reason, if
    given, replaces both reasons for an output that differs between runs."""
    # Ops returning uninitialized memory cannot be compared; detecting them by running twice is
    # flaky (the allocator often hands back the same block), so name them.
    if "empty" in op.name:
        return "output is uninitialized memory"
    args, kwargs = (sample.input,) + tuple(sample.args), sample.kwargs
    try:
        torch.manual_seed(0)
        r1 = op(*args, **kwargs)
        torch.manual_seed(0)
        r2 = op(*args, **kwargs)
        torch.manual_seed(1)
        r3 = op(*args, **kwargs)
        if close_fn(r1, r2) is not None:
            return one_reason or "nondeterministic output (uninitialized memory)"
        if close_fn(r1, r3) is not None:
            return one_reason or "random op (output depends on the RNG seed)"
    except Exception:  # noqa: BLE001  (the sample itself fails: running it will tell)
        return None
    return None


def prepare(op, sample):
    """((fn, primals), None) with every floating-point tensor among the sample's positional
    arguments a primal of fn (kwargs stay constant), or (None, why the sample has none)."""
    args, kwargs = (sample.input,) + tuple(sample.args), sample.kwargs
    flat, spec = tree_flatten(args)
    if any(isinstance(t, torch.Tensor) and t.layout != torch.strided for t in flat + tree_flatten(kwargs)[0]):
        return None, "non-strided (sparse) input"
    pos = [i for i, t in enumerate(flat) if is_diff(t)]
    if not pos:
        return None, "no floating-point tensor argument"
    primals = tuple(flat[i].detach().clone() for i in pos)

    def fn(*ps):
        full = list(flat)
        for i, p in zip(pos, ps):
            full[i] = p
        return op(*tree_unflatten(full, spec), **kwargs)

    return (fn, primals), None


def on_primals(modes, run):
    """A Sweep.run_sample that calls run(fn, primals, seed) on each prepared sample; a sample
    with nothing to differentiate is 'oracle' in every mode."""

    def run_sample(op, sample, seed):
        prepared, why = prepare(op, sample)
        if prepared is None:
            return {m: ("oracle", why) for m in modes}
        return run(*prepared, seed)

    return run_sample


def failure(e, what=""):
    depth = ft._C._stack_depth()
    leak = f" (and left {depth} level(s) on the stack)" if depth else ""
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return "failure", f"{what}{type(e).__name__}: {first}{leak}"


def check_vmapped(run_actual, expected, rows, close_fn, what=""):
    """('correct' | 'failure', detail) of ft.vmap's run_actual() against torch.func's expected;
    the detail notes the ops that went through the for-loop fallback, and where torch.func
    disagrees with the for-loop whose outputs rows() lists, the for-loop decides. what names
    the call in failure details."""
    ft._C._reset_fallback_ops_seen()
    try:
        actual = run_actual()
    except Exception as e:  # noqa: BLE001
        return failure(e, f"{what}: " if what else "")
    if ft._C._stack_depth():
        return "failure", f"{what} left a level on the stack".lstrip()
    fallback = ", ".join(ft._C._fallback_ops_seen())
    note = f"fallback: {fallback}" if fallback else ""
    diff = close_fn(actual, expected)
    if diff is not None:
        if not loop_agrees(actual, rows, close_fn):
            return "failure", f"mismatch: {diff}" + (f" ({note})" if note else "")
        note = (note + "; " if note else "") + f"torch.func disagrees with the for-loop: {diff}"
    return "correct", note


def _no_sample(per_sample):
    return "no sample that torch.func can run: " + "; ".join(sorted({d for _, d in per_sample}))


def _breakdown(sweep, mode, samples):
    return (
        f"threshold {100 * sweep.modes[mode].min_correct:.2f}%; {samples['failure']} failing; "
        f"{samples['oracle']} samples skipped because torch.func cannot run them or they have "
        f"nothing to differentiate"
    )


def _notes_and_correct(results, h):
    notes = collections.OrderedDict()
    for n, (st, ps, _) in results.items():
        for s, d in ps:
            if s == "correct" and d and d not in notes.setdefault(n, []):
                notes[n].append(d)
    notes = {n: ds for n, ds in notes.items() if ds}
    lines = []
    if notes:
        lines += [
            "",
            f"{h} Correct samples with notes (ops that ran through the for-loop "
            "fallback; torch.func disagreeing with the for-loop)",
            "",
        ]
        lines += [f"- `{n}`: {'; '.join(ds)}" for n, ds in notes.items()]
    lines += ["", f"{h} Correct", ""]
    lines.append(", ".join(f"`{n}`" for n, (st, _, _) in results.items() if st == "correct"))
    return lines


@dataclasses.dataclass
class Mode:
    title: str  # what the mode runs, in messages and the report
    min_correct: float  # threshold on the fraction of correct samples
    xfail: dict  # op name -> why it fails
    xfail_name: str  # the xfail dict's name in the sweep file


@dataclasses.dataclass
class Sweep:
    file: str  # "test/test_opinfo_x.py": where the xfail dicts are, named in messages
    report_path: str
    title: str  # the report's first heading
    description: str  # the report's header, after which ops and samples were swept
    modes: dict  # name -> Mode; more than one: each test is parametrized by mode
    run_sample: Callable  # (op, sample, seed) -> {mode: (sample status, detail)}
    close: Callable  # (a, b) -> None or what differs
    random_ops: frozenset  # op names (with or without the variant): skipped without running them
    samples_per_op: int
    min_samples: int  # fewer correct samples: the sweep did not really run
    correct: tuple = ("correct",)  # sample statuses that count as correct, best first
    swept: str | None = None  # an OpInfo flag (supports_autograd): ops without it are left out
    # (op, op_name(op)) -> bool, instead of random_ops naming an op in all its variants
    is_random_op: Callable | None = None
    random_all_samples: bool = False  # look for randomness in every sample, not just the first
    random_one_reason: str | None = None  # see random_reason
    no_sample: Callable = _no_sample  # per_sample -> why an op with only 'oracle' is skipped
    breakdown: Callable = _breakdown  # (sweep, mode, Counter of sample statuses) -> report text
    middle: Callable = _notes_and_correct  # (results, heading marks) -> report lines

    def _is_random_op(self, op, name):
        if self.is_random_op is not None:
            return self.is_random_op(op, name)
        return op.name in self.random_ops or name in self.random_ops

    def run(self):
        """{mode: {op name: (status, [(sample status, detail)], reason)}}, seconds."""
        results = {m: collections.OrderedDict() for m in self.modes}
        done = results[next(iter(self.modes))]  # every mode records the same ops

        def record(name, status, per_sample, reason):
            for m in self.modes:
                results[m][name] = (status, per_sample[m] if per_sample else [], reason)

        start = time.time()
        old_mode = ft.get_vmap_fallback()
        ft.set_vmap_fallback("quiet")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for op in op_db:
                    name = op_name(op)
                    if name in done:
                        continue
                    if self.swept is not None and not getattr(op, self.swept):
                        continue
                    if torch.float32 not in op.supported_dtypes("cpu"):
                        record(name, "skipped", None, "no float32 on CPU")
                        continue
                    if self._is_random_op(op, name):
                        record(name, "skipped", None, "random op")
                        continue
                    seed = zlib.crc32(name.encode())
                    torch.manual_seed(seed)
                    try:
                        samples = []
                        for s in op.sample_inputs("cpu", torch.float32, requires_grad=False):
                            samples.append(s)
                            if len(samples) == self.samples_per_op:
                                break
                    except Exception as e:  # noqa: BLE001
                        record(name, "skipped", None, f"sample_inputs fails: {type(e).__name__}")
                        continue
                    checked = samples if self.random_all_samples else samples[:1]
                    why = next(
                        (
                            r
                            for r in (
                                random_reason(op, s, self.close, self.random_one_reason) for s in checked
                            )
                            if r
                        ),
                        None,
                    )
                    if why:
                        record(name, "skipped", None, why)
                        continue
                    per_sample = {m: [] for m in self.modes}
                    for k, s in enumerate(samples):
                        r = self.run_sample(op, s, seed + k)
                        for m in self.modes:
                            per_sample[m].append(r[m])
                    for m in self.modes:
                        results[m][name] = self.classify(per_sample[m])
        finally:
            ft.set_vmap_fallback(old_mode)
        return results, time.time() - start

    def classify(self, per_sample):
        statuses = {st for st, _ in per_sample if st != "oracle"}
        if not statuses:
            return "skipped", per_sample, self.no_sample(per_sample)
        worst = next(st for st in ("failure",) + self.correct[::-1] if st in statuses)
        return worst, per_sample, ""

    def summarize(self, results):
        counts = collections.Counter(st for st, _, _ in results.values())
        samples = collections.Counter(s for _, ps, _ in results.values() for s, _ in ps)
        correct = sum(samples[s] for s in self.correct)
        tried = correct + samples["failure"]
        return counts, samples, (correct / tried if tried else 0.0)

    def report_lines(self, mode, results, h):
        """The report's section on mode; h: the heading marks of its subsections."""
        counts, samples, fraction = self.summarize(results)
        correct = sum(samples[s] for s in self.correct)
        lines = [
            "",
            f"**Correct samples: {correct} / {correct + samples['failure']} = "
            f"{100 * fraction:.2f}%** ({self.breakdown(self, mode, samples)}).",
            "",
            "| ops | count |",
            "|---|---|",
        ]
        for k in self.correct + ("failure", "skipped"):
            lines.append(f"| {k} | {counts[k]} |")
        lines += ["", f"{h} Failures", "", "| op | xfail reason | first failing sample |", "|---|---|---|"]
        xfail, dict_name = self.modes[mode].xfail, self.modes[mode].xfail_name
        for name, (st, ps, _) in results.items():
            if st == "failure":
                first = next(d for s, d in ps if s == "failure").replace("|", "\\|")
                lines.append(f"| `{name}` | {xfail.get(name, f'**not in {dict_name}**')} | {first} |")
        lines += self.middle(results, h)
        lines += ["", f"{h} Skipped", "", "| op | reason |", "|---|---|"]
        for name, (st, _, reason) in results.items():
            if st == "skipped":
                lines.append(f"| `{name}` | {reason.replace('|', '/')} |")
        return lines

    def write_report(self, all_results, seconds):
        ops = f"op_db ops with {self.swept}=True," if self.swept else "op_db"
        lines = [
            f"# {self.title}",
            "",
            f"torch {torch.__version__}; {ops} float32 CPU samples, first {self.samples_per_op} "
            f"per op, {self.description} Generated by `FT_SWEEP_REPORT=1 python -m pytest "
            f"{self.file}` in {seconds:.1f} s.",
        ]
        if len(self.modes) == 1:
            (only,) = self.modes
            lines += self.report_lines(only, all_results[only], "##")
        else:
            for mode in self.modes:
                lines += ["", f"## {self.modes[mode].title}"]
                lines += self.report_lines(mode, all_results[mode], "###")
        with open(self.report_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def check_correct_fraction(self, results, mode):
        counts, samples, fraction = self.summarize(results)
        assert sum(samples[s] for s in self.correct) > self.min_samples, samples  # it really ran
        m = self.modes[mode]
        assert fraction >= m.min_correct, (
            f"{100 * fraction:.2f}% of OpInfo samples are correct under {m.title}, below the "
            f"{100 * m.min_correct:.2f}% threshold ({samples})"
        )

    def check_xfail_is_exact(self, results, mode):
        xfail, dict_name = self.modes[mode].xfail, self.modes[mode].xfail_name
        title = self.modes[mode].title
        failing = {n for n, (st, _, _) in results.items() if st == "failure"}
        unexpected = {
            n: next(d for s, d in results[n][1] if s == "failure") for n in sorted(failing - set(xfail))
        }
        stale = sorted(set(xfail) - failing)
        # an op missing from the results: every op_db op is there unless swept() left it out
        absent = "not in op_db" if self.swept is None else "not swept"
        msgs = []
        if unexpected:
            msgs.append(
                f"ops failing under {title} that are not in {dict_name} (fix "
                f"them or add them with a reason):\n"
                + "\n".join(f"  {n}: {d}" for n, d in unexpected.items())
            )
        if stale:
            msgs.append(
                f"stale {dict_name} entries: these ops now pass (or are no longer swept), "
                f"remove them from {dict_name} in {self.file}:\n"
                + "\n".join(f"  {n} (now {results[n][0] if n in results else absent})" for n in stale)
            )
        assert not msgs, "\n".join(msgs)


def define_tests(sweep_spec):
    """The `sweep` fixture and the tests test_sweep_correct_fraction and
    test_sweep_xfail_list_is_exact of a sweep file, which assigns them to those names (pytest
    collects them from there). With several modes, each test is parametrized by mode."""

    @pytest.fixture(scope="module")
    def sweep():
        results, seconds = sweep_spec.run()
        if os.environ.get("FT_SWEEP_REPORT") == "1":
            sweep_spec.write_report(results, seconds)
        return results

    if len(sweep_spec.modes) == 1:
        (only,) = sweep_spec.modes

        def test_sweep_correct_fraction(sweep):
            sweep_spec.check_correct_fraction(sweep[only], only)

        def test_sweep_xfail_list_is_exact(sweep):
            sweep_spec.check_xfail_is_exact(sweep[only], only)
    else:

        @pytest.mark.parametrize("mode", list(sweep_spec.modes))
        def test_sweep_correct_fraction(sweep, mode):
            sweep_spec.check_correct_fraction(sweep[mode], mode)

        @pytest.mark.parametrize("mode", list(sweep_spec.modes))
        def test_sweep_xfail_list_is_exact(sweep, mode):
            sweep_spec.check_xfail_is_exact(sweep[mode], mode)

    return sweep, test_sweep_correct_fraction, test_sweep_xfail_list_is_exact
