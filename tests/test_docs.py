"""The README and docs/ say what the repository holds: links resolve, the names they use exist,
the test command is CI's, and the step-speed page's numbers are its stored file's.

Fast (no training, no import of the frameworks): the names in the text are checked from the
source (module files and their top-level definitions), the registry names through the registry.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch

import tuneless
from tuneless.spec import parse_run_spec

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
#: the docs pages this file checks for names and specs (the README's own links reach every page)
PAGES = ["optimizers.md", "benchmark.md", "step-speed.md", "distributed.md", "testing.md", "gpu.md"]
STEP_SPEED_JSON = ROOT / "benchmarks" / "results" / "step_speed.json"
MAX_README_LINES = 300


# ------------------------------------------------------------------ reading markdown

def prose(text: str) -> str:
    """The text outside fenced code blocks (links and headings there are not markdown)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def links(text: str) -> list[str]:
    """Targets of ``[text](target)`` and ``![alt](target)`` in the prose, inline code removed."""
    body = re.sub(r"`[^`\n]*`", "", prose(text))
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", body)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a markdown file's headings, duplicates numbered as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(text), flags=re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


# ------------------------------------------------------------------ the README's shape

def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; at most {MAX_README_LINES}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target.split("#")[0]).resolve() for target in links(README.read_text())}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link to: {missing}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    broken = []
    for target in links(path.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no file {linked.relative_to(ROOT) if ROOT in linked.parents else linked})")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            broken.append(f"{target} (no heading with anchor #{anchor} in {linked.name})")
    assert not broken, f"{path.name}: broken links: {broken}"


def test_anchor_rule_follows_github():
    assert slug("What `fused=True` buys") == "what-fusedtrue-buys"
    assert slug("DoG, L-DoG and DoWG (`dog`, `ldog`, `dowg`): the step size") == "dog-l-dog-and-dowg-dog-ldog-dowg-the-step-size"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_the_readme_test_command_is_what_ci_runs():
    setup = re.search(r"^## Set-up.*?^```bash\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    assert setup, "README.md has no '## Set-up' section with a bash block"
    commands = [line.split("#")[0].strip() for line in setup.group(1).splitlines()]
    assert "make test" in commands and "make demo" in commands
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert "make test" in ci, f".ci/run does not call `make test`: {ci}"
    assert re.search(r"^test:", (ROOT / "Makefile").read_text(), flags=re.M), "the Makefile has no test target"


# ------------------------------------------------------------------ names the text uses

def _defines(module: str, name: str) -> bool:
    """Whether ``module``'s source defines or imports ``name`` at its top level (not importing it,
    so that the integrations' frameworks are not loaded)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, module
    tree = ast.parse(Path(spec.origin).read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((alias.asname or alias.name.split(".")[0]) == name for alias in node.names):
                return True
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
    return False


def resolves(dotted: str) -> bool:
    """``tuneless.a.b.Name``: its modules exist and the first name after them is defined there."""
    parts = dotted.split(".")
    module = parts[0]
    for part in parts[1:]:
        is_package = importlib.util.find_spec(module).submodule_search_locations is not None
        if is_package and importlib.util.find_spec(f"{module}.{part}") is not None:
            module = f"{module}.{part}"
        else:
            return _defines(module, part)
    return True


def dotted_names(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w/.-])(tuneless(?:\.[A-Za-z_]\w*)+)", text))


def spec_strings(text: str) -> set[str]:
    """Optimizer specs the text gives: ``create("...")``'s argument, ``registry name `"x"```, and
    code spans with a scheduler (``adam:lr=1e-3@cosine``)."""
    found = set(re.findall(r"create\(\s*\"([^\"]+)\"", text))
    found |= set(re.findall(r"registry name `\"?([^`\"]+)\"?`", text))
    found |= {span for span in re.findall(r"`([^`\s]+)`", text)
              if re.fullmatch(r"[a-z_][\w.]*(:[^@]*)?@[a-z_]+(:.*)?", span)}
    return found


def test_name_rules_find_what_they_should():
    text = 'x `tuneless.Tuneless` y `src/tuneless/optim` tuneless.create("prodigy:d_coef=2", p) `sgd@cosine`'
    assert dotted_names(text) == {"tuneless.Tuneless", "tuneless.create"}
    assert spec_strings(text) == {"prodigy:d_coef=2", "sgd@cosine"}
    assert resolves("tuneless.averaging.PolynomialDecayAverager")
    assert not resolves("tuneless.Tuneles")
    assert not resolves("tuneless.averaging.PolynomialDecayAveraging")


@pytest.mark.parametrize("page", ["README.md", *PAGES])
def test_every_tuneless_name_exists(page: str):
    text = (ROOT / page if page == "README.md" else DOCS / page).read_text()
    missing = sorted(name for name in dotted_names(text) if not resolves(name))
    assert not missing, f"{page} names what tuneless does not define: {missing}"


@pytest.mark.parametrize("page", ["README.md", *PAGES])
def test_every_spec_builds(page: str):
    """Every registry name and spec the page gives is registered and builds with its arguments
    (a misspelt keyword fails here with the optimizer's own error)."""
    text = (ROOT / page if page == "README.md" else DOCS / page).read_text()
    specs = spec_strings(text)
    if page == "README.md":
        assert "tuneless" in specs, "the README does not give the default's registry name"
    for text_spec in specs:
        run = parse_run_spec(text_spec)
        if not run.optimizer.name.startswith("torch.optim."):
            assert run.optimizer.name in tuneless.available(), f"{page}: {text_spec!r}: not a registry name"
        optimizer = tuneless.create(run.optimizer, [torch.nn.Parameter(torch.zeros(2))])
        if run.scheduler is not None:
            tuneless.create_scheduler(run.scheduler, optimizer, total_steps=10)


# ------------------------------------------------------------------ step speed: the page is its file

def _step_speed_rows() -> dict[tuple[str, str], dict]:
    rows = json.loads(STEP_SPEED_JSON.read_text())["rows"]
    return {(r["set"], r["label"]): r for r in rows}


def fused_speedups(rows: dict[tuple[str, str], dict]) -> dict[str, tuple[float, float]]:
    """For every ``...fused=True`` configuration: its speed over the same configuration without
    it, many-small and few-large (the ratio of their 'x Adam foreach' columns)."""
    out = {}
    for (param_set, label), row in rows.items():
        if param_set != "many-small" or row["source"] != "tuneless" or "fused=True" not in label:
            continue
        base = label.replace(",fused=True", "").replace(":fused=True", "")
        out[label] = tuple(rows[(s, base)]["x_adam_foreach"] / rows[(s, label)]["x_adam_foreach"]
                           for s in ("many-small", "few-large"))
    return out


def test_step_speed_table_is_the_stored_file():
    rows = _step_speed_rows()
    page = (DOCS / "step-speed.md").read_text()
    checked = 0
    for line in page.splitlines():
        m = re.match(r"\| ([a-z_]+(?::[^ |]+)?) \| ([\d.]+) / ([\d.]+) \| ([\d.]+) \| ([^|]+) \| (\d+) \| (\d+) \| (\d+) \|$", line)
        if not m:
            continue
        label = m.group(1)
        ms, fl = rows[("many-small", label)], rows[("few-large", label)]
        faster = ("no package" if ms["reference"] is None
                  else f"{ms['speedup_vs_reference']:.2f} / {fl['speedup_vs_reference']:.2f}")
        expected = (f"{ms['x_bound']:.1f}", f"{fl['x_bound']:.1f}", f"{ms['x_adam_foreach']:.2f}", faster,
                    str(round(ms["state_bytes_per_param"])), str(round(ms["workspace_bytes_per_param"])),
                    str(round(ms["syncs_per_step"])))
        assert tuple(g.strip() for g in m.groups()[1:]) == expected, f"step-speed.md, row {label}"
        checked += 1
    tuneless_rows = {label for (s, label), r in rows.items() if s == "many-small" and r["source"] == "tuneless"}
    assert checked == len(tuneless_rows), f"the page's table has {checked} rows, the file {len(tuneless_rows)}"


def test_fused_speed_claims_are_the_stored_file():
    speedups = fused_speedups(_step_speed_rows())
    assert speedups, "no fused rows in the step-speed file"
    page = (DOCS / "step-speed.md").read_text()
    for label, (small, large) in speedups.items():
        assert f"`{label}` | {small:.2f}x | {large:.2f}x |" in page, f"step-speed.md: fused row {label}"
    whole = [v for label, pair in speedups.items() if not label.startswith("mechanic") for v in pair]
    mechanic = [v for label, pair in speedups.items() if label.startswith("mechanic") for v in pair]
    every = whole + mechanic
    ranges = {name: f"{min(v):.2f}x to {max(v):.2f}x" for name, v in
              (("whole step compiled", whole), ("mechanic", mechanic), ("all", every))}
    assert all(math.isfinite(v) for v in every)
    flat = " ".join(page.split())
    for name, text in ranges.items():
        assert text in flat, f"step-speed.md does not state the {name} range as the file has it: {text}"
    optimizers = " ".join((DOCS / "optimizers.md").read_text().split())
    for name in ("whole step compiled", "mechanic"):
        assert ranges[name] in optimizers, f"optimizers.md: the fused range ({name}) is not {ranges[name]}"


def test_nonfinite_cost_claims_are_the_stored_file():
    """The README's table of what the non-finite check costs is benchmarks/results/nonfinite_cost.json:
    the named rows exactly (to the printed digit), each range the minimum and maximum over the
    optimizers it names, on the path it names."""
    import json
    import re

    rows = json.loads((ROOT / "benchmarks" / "results" / "nonfinite_cost.json").read_text())["rows"]
    cost = {(r["optimizer"], r["path"], r["set"]): 100 * r["cost"] for r in rows}
    readme = (ROOT / "README.md").read_text()

    def pct(x: float) -> str:
        return f"{x:+.1f}%"

    def pair(name: str, path: str) -> str:
        return f"{pct(cost[name, path, 'many-small'])} / {pct(cost[name, path, 'few-large'])}"

    assert re.search(rf"\| `Tuneless`, the default \| {re.escape(pair('tuneless', 'vectorized'))} \([^)]*\); "
                     rf"`fused=True`: {re.escape(pair('tuneless', 'fused'))} ", readme)
    assert f"| {pair('prodigy', 'fused')}, {pair('adam_hd', 'fused')}, {pair('mechanic', 'fused')} |" in readme
    ranges = {
        "vectorized (Prodigy, COCOB": ("vectorized", ["prodigy", "cocob", "momo", "momo_star", "momo_adam", "sf_sgd",
                                                      "sf_adamw", "sf_prodigy", "sf_plus", "dadapt_adam",
                                                      "dadapt_adagrad", "adam_hd", "mechanic"]),
        "vectorized (Polyak, SPS": ("vectorized", ["polyak", "sps", "sps_max", "dog", "ldog", "dowg", "dadapt_sgd",
                                                   "sgd_hd"]),
        "other fused kernels": ("fused", ["cocob", "dadapt_adam", "dadapt_adagrad", "sf_prodigy", "sf_sgd",
                                          "sf_adamw"]),
    }
    for label, (path, names) in ranges.items():
        values = [cost[n, path, s] for n in names for s in ("many-small", "few-large")]
        line = next(line for line in readme.splitlines() if label in line)
        assert line.rstrip().endswith(f"| {pct(min(values))} to {pct(max(values))} |"), (line, min(values), max(values))
    covered = {n for _, names in ranges.values() for n in names} | {"tuneless", "prodigy", "adam_hd", "mechanic"}
    assert {r["optimizer"] for r in rows} <= covered, "an optimizer of the file is in no row of the README's table"


def _ablation_module():
    spec = importlib.util.spec_from_file_location("default_ablation", ROOT / "benchmarks" / "default_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("view, page", [("target", README), ("train", DOCS / "benchmark.md")])
def test_the_result_tables_are_the_stored_runs(view: str, page: Path):
    """The README's headline table (held-out metrics) and docs/benchmark.md's second view
    (training loss) are what ``default_ablation.py --headline ... --view`` renders from the
    stored runs, row for row."""
    results = ROOT / "benchmarks" / "results"
    table = _ablation_module().headline(results / "default-design.sqlite", results / "default-heldout.sqlite", view=view)
    text = page.read_text()
    for row in table.splitlines():
        assert row in text, f"{page.name}: {row}"


def test_the_budget_claims_are_the_stored_projection():
    """docs/benchmark.md's projected time of the full suite is benchmarks/results/suite_budget_full.md's."""
    first = (ROOT / "benchmarks" / "results" / "suite_budget_full.md").read_text().splitlines()[0]
    m = re.search(r"(\d+) runs, ([\d.]+) min of runs in all; on 2 worker\(s\), packed longest first: \*\*([\d.]+) min",
                  first)
    assert m, first
    page = (DOCS / "benchmark.md").read_text()
    assert f"{m.group(1)} runs, projected at **{round(float(m.group(3)))} minutes**\n  on 2 workers" in page


@pytest.mark.slow
def test_the_full_suite_table_is_the_stored_run():
    """docs/benchmark.md's table of the timed ``tuneless bench full`` run (AlgoPerf score and
    counts per method) is what ``benchmarks/bench_summary.py`` renders from the stored copy."""
    spec = importlib.util.spec_from_file_location("bench_summary", ROOT / "benchmarks" / "bench_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.summary(ROOT / "benchmarks" / "results" / "bench-full.sqlite")
    page = (DOCS / "benchmark.md").read_text()
    assert table.count("\n") >= 19, table  # 18 methods and the header
    for row in table.splitlines():
        assert row in page, row


def test_the_gpu_page_is_the_stored_check():
    """docs/gpu.md's correctness table is the stored checker's output, row for row (its first
    four columns), and every registered tuneless optimizer has a row."""
    stored = (ROOT / "benchmarks" / "results" / "gpu-h200" / "check_gpu.md").read_text()
    page = (DOCS / "gpu.md").read_text()

    def rows(text: str) -> dict[str, list[str]]:
        """optimizer -> (syncs, CUDA vs CPU, fused vs vectorized): the rows whose second cell is a
        sync count (the page's benchmark table has rows named after optimizers too)."""
        out = {}
        for line in text.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("| ") and re.fullmatch(r"[a-z_]+", cells[0]) and cells[1:2] in (["0"], ["FAIL"], ["n/a"]):
                out[cells[0]] = cells[1:4]
        return out

    on_page = rows(page)
    assert on_page == rows(stored)
    assert sorted(on_page) == sorted(tuneless.available(source="tuneless"))
    machine = (ROOT / "benchmarks" / "results" / "gpu-h200" / "machine.txt").read_text()
    for fact in ("NVIDIA H200", "580.159.04", "torch 2.11.0+cu130", "triton 3.6.0"):
        assert fact in machine
    assert "torch 2.11.0+cu130" in " ".join(page.split())


def test_the_gpu_step_times_are_the_stored_runs():
    """docs/gpu.md's step-time table: each time and ratio is in the stored fused_at_scale.py
    output it names (the vectorized column from the first call, the fused one from the second)."""
    stored = ROOT / "benchmarks" / "results" / "gpu-h200"
    first = (stored / "fused_at_scale_call1.md").read_text()
    second = (stored / "fused_at_scale_call2.md").read_text()
    page = " ".join((DOCS / "gpu.md").read_text().split())

    def cell(text: str, name: str, column: str) -> tuple[str, str]:
        lines = [line for line in text.splitlines() if line.startswith("| ")]
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        row = next(line for line in lines if line.startswith(f"| {name} |"))
        value = [c.strip() for c in row.strip("|").split("|")][header.index(column)]
        ms, ratio = re.fullmatch(r"([0-9.]+) ms \(([0-9.]+)x\)", value).groups()
        return ms, ratio

    for name in ("adam_hd", "tuneless"):
        vec_ms, vec_x = cell(first, name, "vectorized")
        fused_ms, fused_x = cell(second, name, "large first")
        assert "timeout" in next(line for line in second.splitlines() if line.startswith(f"| {name} |"))
        assert (f"| {name} | {vec_ms} ms ({float(vec_x):.1f}x) | {fused_ms} ms ({float(fused_x):.1f}x) |") in page
    for text in (first, second):
        ref = re.search(r"AdamW\(fused=True\), ([0-9.]+) ms", text).group(1)
        assert f"{ref} ms" in page


def test_the_default_speed_table_is_its_stored_file():
    """docs/default.md's speed table, its targets row and the README's ranges are those of
    benchmarks/results/step_speed_tuneless.json."""
    rows = json.loads((ROOT / "benchmarks" / "results" / "step_speed_tuneless.json").read_text())["rows"]
    ratio = {(r["label"], r["set"]): r for r in rows}
    vec = [ratio[("tuneless", s)]["x_bound"] for s in ("many-small", "few-large")]
    fused = [ratio[("tuneless:fused=True", s)]["x_bound"] for s in ("many-small", "few-large")]
    page = " ".join((DOCS / "default.md").read_text().split())
    assert (f"| `fused=True` | **{fused[0]:.2f}x**, {ratio[('tuneless:fused=True', 'many-small')]['x_adam_foreach']:.2f}x | "
            f"**{fused[1]:.2f}x**, {ratio[('tuneless:fused=True', 'few-large')]['x_adam_foreach']:.2f}x |") in page
    assert (f"| vectorized (default) | {vec[0]:.2f}x, {ratio[('tuneless', 'many-small')]['x_adam_foreach']:.2f}x | "
            f"{vec[1]:.2f}x, {ratio[('tuneless', 'few-large')]['x_adam_foreach']:.2f}x |") in page
    assert f"fused {fused[0]:.2f}x / {fused[1]:.2f}x" in page and f"vectorized {vec[0]:.2f}x / {vec[1]:.2f}x" in page
    readme = " ".join(README.read_text().split())
    assert (f"at {min(vec):.1f}x-{max(vec):.1f}x its bound vectorized and at {min(fused):.1f}x-{max(fused):.1f}x "
            "with `fused=True`") in readme


def test_the_fused_sum_dtype_ratios_are_the_stored_run():
    """docs/default.md's before/after ratios of the fused step's statistics kernel are those of
    benchmarks/results/fused_sum_dtype.txt (python benchmarks/fused_sum_dtype.py)."""
    stored = (ROOT / "benchmarks" / "results" / "fused_sum_dtype.txt").read_text()
    ratios = re.findall(r"the step with float64 sums takes ([0-9.]+)x the time of the current one", stored)
    assert len(ratios) == 2
    page = " ".join((DOCS / "default.md").read_text().split())
    assert (f"the step with float64 sums took {ratios[0]}x (many small tensors) and {ratios[1]}x (few large) "
            "the time of the current one") in page
