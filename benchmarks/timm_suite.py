"""timm's own tests/test_models.py on every ViT arch vitmha builds, with ``vitmha.create_backbone`` answering its
``create_model``: the per-test pass/fail table of benchmarks/timm_suite.md.

    python benchmarks/timm_suite.py [--quick] [--archs GLOB,GLOB] [--max-params 1.3e9] [--budget-min 600]

The pinned suite (tests/timm_suite/test_models.py, timm's file unchanged) runs under tests/timm_suite/conftest.py
in one subprocess per arch, smallest arch first, on one CPU thread, offline (HF_HUB_OFFLINE=1; the real ViT-Ti
weights, when ../shared/weights has them, seeded into a temporary hub cache, as tests/test_timm_suite.py does).
Each arch's junit report is kept in --cache, so a run that was stopped resumes where it was. Archs above
--max-params, or not reached within --budget-min minutes, are listed as not run. ``--quick``: two small archs.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "tests" / "timm_suite" / "test_models.py"
sys.path.insert(0, str(REPO))

#: the suite's test functions that take an arch, with the table's column names
COLUMNS = {
    "test_model_forward": "forward", "test_model_backward": "backward",
    "test_model_default_cfgs_non_std": "default cfgs", "test_model_forward_torchscript": "TorchScript",
    "test_model_forward_intermediates_features": "features_only", "test_model_forward_intermediates": "intermediates",
    "test_model_forward_fx": "FX", "test_model_backward_fx": "FX backward",
    "test_model_forward_fx_torchscript": "FX + TorchScript", "test_model_load_pretrained": "load pretrained",
    "test_model_inference": "inference",
}
OFFLINE = "HF_HUB_OFFLINE is set"
TIMM_SKIP = "Fixed input size model > limit."
QUICK = ("vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224")


def suite_env(hub: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTEST_"))}
    env.update(VITMHA_TIMM_SUITE="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               HF_HUB_CACHE=str(hub), PYTHONWARNINGS="ignore")
    return env


def supported_archs(patterns) -> list:
    """The archs of timm's ViT modules that vitmha builds (the conftest's own selection), matching ``patterns``."""
    from tests.timm_suite.conftest import vit_archs, vitmha_builds

    return [a for a in sorted(vit_archs()) if (not patterns or any(fnmatch.fnmatch(a, p) for p in patterns))
            and vitmha_builds(a)]


def param_count(arch: str) -> int:
    import timm
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(arch).parameters())


def run_suite(archs, env: dict, report: Path, timeout: float) -> None:
    """Run the suite on ``archs`` into the junit ``report`` (written only when the run ends)."""
    tmp = report.with_suffix(".part")
    try:
        subprocess.run([sys.executable, "-m", "pytest", str(SUITE), "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                        f"--junitxml={tmp}"], cwd=REPO, env=dict(env, VITMHA_TIMM_ARCHS=",".join(archs)),
                       capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    if tmp.is_file():
        os.replace(tmp, report)


def read_report(report: Path) -> dict:
    """{arch: {test id: (outcome, message, seconds)}} of a junit report."""
    out = defaultdict(dict)
    for case in ET.parse(report).iter("testcase"):
        name = case.get("name")
        outcome, msg = "passed", ""
        for kind in ("failure", "error", "skipped"):
            el = case.find(kind)
            if el is not None:
                outcome, msg = ("skipped" if kind == "skipped" else "failed"), (el.get("message") or "")
                break
        arch = name.split("[", 1)[1].rstrip("]").split("-", 1)[1].split(".")[0]
        out[arch][name] = (outcome, " ".join(msg.split()), float(case.get("time") or 0))
    return out


def groups_of(archs: list, params: dict, max_group_params: float = 2.5e8) -> list:
    """Consecutive archs in runs of at most ``max_group_params`` parameters together (one subprocess each: the
    suite's collection costs ~20 s a run), each bigger arch alone."""
    groups, cur = [], []
    for a in archs:
        if cur and sum(params[b] for b in cur) + params[a] > max_group_params:
            groups.append(cur)
            cur = []
        cur.append(a)
    return groups + ([cur] if cur else [])


def reason(func: str, outcome: str, msg: str) -> str:
    if outcome == "skipped" and msg.endswith(TIMM_SKIP):
        return "skipped by timm: the arch's fixed input size is above this test's size limit"
    if outcome == "failed" and OFFLINE in msg:
        what = "timm's test tensors and the weights" if func == "test_model_inference" else "the pretrained weights"
        return f"needs {what} from the Hugging Face hub; run offline here (no network)"
    return f"{outcome}: {msg[:300]}"


def cell(results: list) -> str:
    """One table cell from the (outcome, message) of every test of a function on an arch (one per tag)."""
    if not results:
        return "–"
    n, ok = len(results), sum(o == "passed" for o, _ in results)
    skipped = sum(o == "skipped" for o, _ in results)
    if n == 1:
        return {"passed": "✓", "skipped": "s", "failed": "✗"}[results[0][0]]
    return f"{ok}/{n}" + (f" ({skipped} s)" if skipped else "")


def write_table(path: Path, archs: list, results: dict, not_run: dict, params: dict) -> None:
    funcs = list(COLUMNS)
    lines = ["# timm's test_models.py on vitmha's ViTs", "",
             "timm's own model tests (`tests/test_models.py` of timm 1.0.29.dev, pinned unchanged in",
             "`tests/timm_suite/test_models.py`) with `create_model` answered by `vitmha.create_backbone`, on every",
             "architecture of timm's `vision_transformer` and `deit` modules that vitmha builds. Made by",
             "`python benchmarks/timm_suite.py` (one CPU thread, offline); CI runs nine of these archs, one per ViT",
             "family (`tests/test_timm_suite.py`).", "",
             "✓ passed · ✗ failed · s skipped by timm · k/n: k of the arch's n tags passed · – timm's suite does",
             "not run this test on this arch (its own exclusions, or no pretrained tag) · not run: see below.", ""]
    summary = {f: Counter() for f in funcs}
    why = defaultdict(list)
    rows = []
    for arch in archs:
        if arch in not_run:
            rows.append(f"| {arch} | {params[arch] / 1e6:.0f}M | " + " | ".join("not run" for _ in funcs) + " | |")
            continue
        cells = []
        for f in funcs:
            res = [(t, r) for t, r in sorted(results[arch].items()) if t.startswith(f + "[")]
            for t, (o, m, _) in res:
                summary[f][o] += 1
                if o != "passed":
                    why[reason(f, o, m)].append(t)
            cells.append(cell([(o, m) for _, (o, m, _) in res]))
        secs = sum(r[2] for r in results[arch].values())
        rows.append(f"| {arch} | {params[arch] / 1e6:.0f}M | " + " | ".join(cells) + f" | {secs:.0f} |")
    done = len(archs) - len(not_run)
    lines += [f"{done} of the {len(archs)} archs run; per test function, over all their tests (one per arch, or",
              "one per pretrained tag for the tagged ones):", "",
              "| test | passed | failed | skipped by timm |", "|---|---|---|---|"]
    for f in funcs:
        c = summary[f]
        lines.append(f"| {f} | {c['passed']} | {c['failed']} | {c['skipped']} |")
    lines += ["", "TorchScript and torch.fx take the encoder as they take timm's: `torch.jit.is_scripting()` leaves out",
              "the eager-only branches (attention maps, the distilled model's two outputs while training, gradient",
              "checkpointing), and the helpers that depend on values known only when the model runs (the input-size",
              "check, the position-embedding resampling, the causal mask, the explicit attention) are `torch.fx.wrap`",
              "leaves, so a traced model still checks its input and resamples to each input size. The tests that fail",
              "here are those that download from the Hugging Face hub (this machine has no network); the one",
              "pretrained tag that is here, seeded into a local cache, passes. Families with no small arch in timm's",
              "registry for CI (qk-norm, SwiGLU, packed SwiGLU, QuickGELU, tanh GELU) have the same TorchScript and FX",
              "checks in `tests/test_models.py`."]
    lines += ["", "## Every test that did not pass, and why", ""]
    for r, tests in sorted(why.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"- **{r}** ({len(tests)}): " + ", ".join(f"`{t}`" for t in sorted(tests)[:30])
                     + (f" … and {len(tests) - 30} more" if len(tests) > 30 else ""))
    if not why:
        lines.append("- none")
    if not_run:
        lines += ["", "## Not run here", ""]
        for r, names in sorted(_group(not_run).items()):
            lines.append(f"- {r}: " + ", ".join(f"`{a}`" for a in names))
    lines += ["", "## Per arch", "", "| arch | params | " + " | ".join(COLUMNS.values()) + " | s |",
              "|---|---|" + "---|" * len(funcs) + "---|", *rows, ""]
    path.write_text("\n".join(lines))


def _group(d: dict) -> dict:
    out = defaultdict(list)
    for k, v in d.items():
        out[v].append(k)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"only {', '.join(QUICK)}, in one run (under a minute); prints the summary")
    ap.add_argument("--archs", default="", help="comma-separated globs on arch names (default: every one)")
    ap.add_argument("--max-params", type=float, default=1.3e9, help="archs above are not run (memory, time)")
    ap.add_argument("--budget-min", type=float, default=float("inf"), help="start no arch after this")
    ap.add_argument("--timeout-min", type=float, default=90, help="per arch")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "vitmha_timm_suite"),
                    help="folder of the per-arch junit reports (an interrupted run resumes from them)")
    ap.add_argument("--out", default=None, help="the table (default: benchmarks/timm_suite.md; --quick: none)")
    args = ap.parse_args(argv)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    patterns = list(QUICK) if args.quick else [p for p in args.archs.split(",") if p]
    archs = supported_archs(patterns)
    params = {a: param_count(a) for a in archs}
    archs.sort(key=lambda a: (params[a], a))
    results, not_run = {}, {}
    with tempfile.TemporaryDirectory() as hub:
        from tests.conftest import REAL_NAME, REAL_WEIGHTS

        if REAL_WEIGHTS.is_file():
            from vitmha.models.hub import seed_hf_cache

            seed_hf_cache(REAL_NAME, REAL_WEIGHTS, cache_dir=hub)
        env = suite_env(Path(hub))
        start = time.perf_counter()
        todo = []
        for arch in archs:
            cached = cache / f"{arch}.json"
            if params[arch] > args.max_params:
                not_run[arch] = (f"over {args.max_params / 1e9:g}B parameters (backward needs more memory and hours "
                                 "more than this 2-core, 23 GB machine has; `--max-params` runs them)")
            elif cached.is_file() and not args.quick:
                results[arch] = {k: tuple(v) for k, v in json.loads(cached.read_text()).items()}
            else:
                todo.append(arch)
        groups = [todo] if args.quick else groups_of(todo, params)
        for i, group in enumerate(groups, 1):
            if (time.perf_counter() - start) / 60 > args.budget_min:
                not_run.update({a: (f"not run: past this run's {args.budget_min:g}-minute budget (on one CPU thread the "
                                    "suite takes about a minute per 60M parameters, some 8 hours for every arch); "
                                    "`python benchmarks/timm_suite.py` adds them, keeping the archs done")
                                for a in group})
                continue
            t = time.perf_counter()
            report = cache / "run.xml"
            report.unlink(missing_ok=True)
            run_suite(group, env, report, args.timeout_min * 60 * len(group))
            found = read_report(report) if report.is_file() else {}
            for a in group:
                if a in found:
                    results[a] = found[a]
                    (cache / f"{a}.json").write_text(json.dumps(found[a]))
                else:
                    not_run[a] = "crashed or timed out before writing its report"
            print(f"[{i}/{len(groups)}] {','.join(group)} {time.perf_counter() - t:.0f}s", flush=True)
    out = Path(args.out) if args.out else (None if args.quick else REPO / "benchmarks" / "timm_suite.md")
    if out is not None:
        write_table(out, archs, results, not_run, params)
        print(f"wrote {out}")
    for arch in archs:
        if arch in results:
            c = Counter(o for o, _, _ in results[arch].values())
            print(f"{arch}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
