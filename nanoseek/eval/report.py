"""`nanoseek report RUN_OR_SPEEDRUN_DIR`: a report card (report.md + PNG plots) from the files runs leave behind.

Reads every stage directory it finds (a run directory has metrics.jsonl; a speedrun directory has one per stage and
a summary.json): loss curves (main and MTP), expert load imbalance per MoE layer over time, GRPO reward /
accuracy / response length, held-out accuracy by stage, by level and by family (a table and accuracy.png), a
distillation's teacher against its student (pass@1, parameters, decode tokens/s), and a cost table in the style of
DeepSeek-V3's (device-hours per stage, FLOPs, MFU, dollars at a configurable price, a stage that never finished
marked as interrupted), plus the machine the runs recorded in their cost.json. A damaged file, or a damaged entry in
one, only makes the report say less.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import atomic
from ..train.metrics import read_metrics


def read_json(path: Path) -> dict:
    """A run's JSON file (cost.json, summary.json), or {} when it is missing or damaged (the report says less)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return {}
    return data if isinstance(data, dict) else {}


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)  # JSON true/false are ints to Python


def read_rows(run: Path) -> list[dict]:
    """A run's metrics rows; a row without a numeric step is damaged and left out."""
    return [r for r in read_metrics(run / "metrics.jsonl") if number(r.get("step"))]


def series(rows: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the rows that logged a number under key."""
    points = [(r["step"], r[key]) for r in rows if number(r.get(key))]
    return [s for s, _ in points], [v for _, v in points]


def stage_dirs(root: Path) -> dict[str, Path]:
    if (root / "metrics.jsonl").is_file():
        return {root.name: root}
    if (root / "distill.json").is_file() and (root / "student" / "metrics.jsonl").is_file():
        return {"distill": root / "student"}  # a lone distill run: its student's SFT, costed with the traces
    found = {}
    from ..speedrun import STAGES  # a speedrun's stages, listed in the order they ran

    order = lambda p: (STAGES.index(p.name) if p.name in STAGES else len(STAGES), p.name)  # noqa: E731
    for p in sorted(root.iterdir(), key=order):  # distill keeps its student's training run in student/
        run = next((d for d in (p, p / "student") if (d / "metrics.jsonl").is_file()), None)
        if run is None and (p / "traces_cost.json").is_file():
            run = p  # a distillation stopped before its student's SFT: the teacher's traces cost device time already
        if run is not None:
            found[p.name] = run
    return found


def machine() -> str:
    """The machine making this report: named only when the runs did not record theirs."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} × {torch.cuda.device_count()}"
    from ..device import cpu_name

    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def machine_line(rows: list[dict]) -> str:
    """The device each stage recorded in its cost.json (one line, stages named when they differ)."""
    stages: dict[str | None, list[str]] = {}
    for r in rows:
        stages.setdefault(r["device"], []).append(r["stage"])
    if not any(stages):
        return f"Machine: not recorded by the runs; this report was made on {machine()}"
    if len(stages) == 1:
        return f"Machine (recorded by the runs): {next(iter(stages))}"
    return "Machines (recorded by the runs): " + "; ".join(f"{device or 'not recorded'} ({', '.join(names)})"
                                                           for device, names in stages.items())


def plot_training(name: str, rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    steps, loss = series(rows, "loss")
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, loss, label="main loss")
        mtp_steps, mtp = series(rows, "mtp_loss")
        if any(mtp):
            ax.plot(mtp_steps, mtp, label="MTP loss")
        ax.set(xlabel="step", ylabel="cross-entropy", title=f"{name}: loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{name}_loss.png", dpi=110)
        plt.close(fig)
        made.append(f"{name}_loss.png")
    imb = [(r["step"], v) for r in rows
           if isinstance(v := r.get("expert_imbalance"), list) and v and all(map(number, v))]
    if imb:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for layer in range(len(imb[0][1])):
            ax.plot([s for s, _ in imb], [v[layer] if layer < len(v) else None for _, v in imb], label=f"MoE layer {layer}")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set(xlabel="step", ylabel="max load / mean load", title=f"{name}: expert load imbalance")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{name}_experts.png", dpi=110)
        plt.close(fig)
        made.append(f"{name}_experts.png")
    if series(rows, "reward")[0]:
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
        for ax, key in zip(axes, ("reward", "accuracy", "response_length")):
            ax.plot(*series(rows, key))
            ax.set(xlabel="step", title=key)
        evals = [(r["step"], r["eval"]["pass@1"]) for r in rows
                 if isinstance(r.get("eval"), dict) and number(r["eval"].get("pass@1"))]
        if evals:
            axes[1].plot([s for s, _ in evals], [v for _, v in evals], "o--", label="held-out pass@1")
            axes[1].legend(fontsize=7)
        fig.suptitle(f"{name}: GRPO")
        fig.tight_layout()
        fig.savefig(out / f"{name}_rl.png", dpi=110)
        plt.close(fig)
        made.append(f"{name}_rl.png")
    return made


def pass_at_1(groups) -> dict[str, float]:
    """{name: pass@1} of a summary's levels or families, without the damaged entries."""
    if not isinstance(groups, dict):
        return {}
    return {str(k): v["pass@1"] for k, v in groups.items() if isinstance(v, dict) and number(v.get("pass@1"))}


def read_accuracy(root: Path, dirs: dict[str, Path]) -> dict[str, dict]:
    """Held-out accuracy, {stage: {"pass@1": p, "levels": {level: p}, "families": {family: p}}}, of the stages with a
    pass@1: a finished speedrun's summary.json, or (one in progress, or stopped) the held_out.json each scored stage
    keeps."""
    stages = read_json(root / "summary.json").get("stages")
    if not isinstance(stages, dict):
        stages = {name: read_json(run / "held_out.json").get("summary") for name, run in dirs.items()}
    return {name: {"pass@1": s["pass@1"], "levels": pass_at_1(s.get("levels")),
                   "families": pass_at_1(s.get("families"))}
            for name, s in stages.items() if isinstance(s, dict) and number(s.get("pass@1"))}


def plot_accuracy(stages: dict[str, dict], out: Path) -> list[str]:
    """accuracy.png: held-out pass@1 of the stages (read_accuracy), overall and by level (left), by family (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not stages:
        return []
    panels = [("by level", lambda s: {"all": s["pass@1"], **{f"L{k}": v for k, v in s["levels"].items()}})]
    if any(s["families"] for s in stages.values()):
        panels.append(("by family", lambda s: s["families"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.4), squeeze=False)
    for ax, (title, groups) in zip(axes[0], panels):
        values = {name: groups(s) for name, s in stages.items()}
        keys = list(dict.fromkeys(k for v in values.values() for k in v))  # x groups: all, L1, L2, ... or families
        width = 0.8 / len(values)
        for i, (name, v) in enumerate(values.items()):
            ax.bar([x + i * width for x in range(len(keys))], [v.get(k, 0.0) for k in keys], width, label=name)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))], keys)
        ax.set(ylim=(0, 1), ylabel="held-out pass@1", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
    return ["accuracy.png"]


def cost_rows(root: Path, dirs: dict[str, Path], price: float | None) -> list[dict]:
    """One row per stage: its cost.json (without one, the wall-clock it logged), the price its dollars are at, the
    device it recorded, and for a stage that never finished a note of how far it got."""
    # A speedrun writes done.json when a stage ends; a lone run (pretrain, sft, grpo, distill) ends with its cost.json.
    speedrun = any((root / name / "done.json").is_file() for name, run in dirs.items() if run != root)
    rows = []
    for name, run in dirs.items():
        # a distill run's student (found from the distill run above it) is costed with the teacher's traces: its
        # parent's cost.json; a student directory reported on its own, with its own
        d = run.parent if run != root and run.name == "student" and (run.parent / "cost.json").is_file() else run
        cost = read_json(d / "cost.json")
        traces = read_json(d / "traces_cost.json") if not cost else {}
        if number(traces.get("wall_s")):  # no cost.json yet: what the saved traces cost, FLOPs from a local teacher
            cost = {"device_hours": round(traces["wall_s"] / 3600, 5), "flops": traces.get("flops")}
        known = {k: v for k, v in cost.items() if number(v)}  # a damaged field is left out
        finished = (root / name / "done.json").is_file() if speedrun else "device_hours" in known
        logged = [] if finished and "device_hours" in known else read_rows(run)
        walls = [r["wall_s"] for r in logged if number(r.get("wall_s"))]
        hours = known.get("device_hours", round(walls[-1] / 3600, 5) if walls else 0.0)
        p = price if price is not None else known.get("price_per_device_hour", 2.0)
        device = cost.get("device") if isinstance(cost.get("device"), str) else None
        if device and known.get("devices", 1) > 1:
            device = f"{known['devices']} × {device}"
        note = None if finished else "interrupted" + (f" at step {logged[-1]['step']}" if logged else
                                                      " collecting the teacher's traces" if traces else "")
        state = read_json(run / "train_state" / "state.json")  # a run stopped early (--stop-at) also wrote its cost
        step, steps = state.get("step"), (state.get("config") or {}).get("steps")
        if finished and number(step) and number(steps) and step < steps:
            note = f"stopped at step {step} of {steps}"
        parts = cost.get("parts") if isinstance(cost.get("parts"), dict) else {}
        tt = parts.get("teacher_traces") if isinstance(parts.get("teacher_traces"), dict) else {}
        url_wait = tt["wall_s"] if "flops" in tt and tt["flops"] is None and number(tt.get("wall_s")) else None
        rows.append({"stage": name, "device_hours": hours, "flops": known.get("flops"), "mfu": known.get("mfu"),
                     "price": p, "dollars": round(hours * p, 4), "device": device, "note": note, "url_wait_s": url_wait})
    return rows


def cost_table(rows: list[dict]) -> list[str]:
    lines = ["## Cost (DeepSeek-V3 style)", "", "| stage | device-hours | FLOPs | MFU | dollars |", "|---|---|---|---|---|"]
    for r in rows:
        stage = f"{r['stage']} ({r['note']})" if r["note"] else r["stage"]
        flops = f"{r['flops']:.3g}" if r["flops"] else "–"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "–"
        lines.append(f"| {stage} | {r['device_hours']:.4f} | {flops} | {mfu} | ${r['dollars']:.4f} |")
    total_h, total = sum(r["device_hours"] for r in rows), sum(r["dollars"] for r in rows)
    prices: dict[float, list[str]] = {}
    for r in rows:
        prices.setdefault(r["price"], []).append(r["stage"])
    at = ", ".join(f"${p:g}/device-hour" + (f" ({', '.join(names)})" if len(prices) > 1 else "")
                   for p, names in prices.items())
    lines += [f"| **total** | {total_h:.4f} | | | ${total:.4f} |", "",
              f"Dollars at {at} (DeepSeek-V3: 2.788M H800 GPU-hours = $5.576M at $2).", ""]
    lines += ["Each stage counts its training loop: GRPO's rollouts and updates, a distillation's student SFT and the "
              "traces of a local teacher. Setup (data, tokenizer, loading), held-out evaluations and a URL teacher's time "
              "are not counted, nor the steps an interrupted invocation ran after its last checkpoint.", ""]
    lines += [f"{r['stage']}: the URL teacher's traces took {r['url_wait_s']:.3g} s of waiting, not counted above "
              "(they ran on the teacher's machine)." for r in rows if r.get("url_wait_s")]
    if any(r.get("url_wait_s") for r in rows):
        lines.append("")
    if any(r["note"] for r in rows):
        lines += ["An interrupted stage counts only the device time it had recorded when it stopped.", ""]
    return lines


def teacher_and_student(root: Path) -> dict[str, dict]:
    """{"teacher": {...}, "student": {...}}: pass@1, parameters (total, active) and decode tokens/s of a distillation,
    from a speedrun's summary.json or a lone distill run's report.json; {} when neither records them."""
    keys = ("pass@1", "params_total", "params_active", "decode_tokens_per_s")
    d = read_json(root / "summary.json").get("stages", {})
    d = d.get("distill") if isinstance(d, dict) else None
    if isinstance(d, dict):
        found = {"teacher": {k: d.get(f"teacher_{k}") for k in keys}, "student": {k: d.get(k) for k in keys}}
    else:
        rep = read_json(root / "report.json")
        found = {who: {k: rep[who].get(k) for k in keys} for who in ("teacher", "student")
                 if isinstance(rep.get(who), dict)}
    return {who: v for who, v in found.items() if any(number(x) for x in v.values())}


def teacher_student_table(models: dict[str, dict]) -> list[str]:
    def cell(v, fmt):
        return format(v, fmt) if number(v) else "–"

    lines = ["## Teacher vs student", "", "| model | pass@1 | parameters (total) | active | decode tokens/s |",
             "|---|---|---|---|---|"]
    for who, m in models.items():
        lines.append(f"| {who} | {cell(m['pass@1'], '.3f')} | {cell(m['params_total'], ',')} | "
                     f"{cell(m['params_active'], ',')} | {cell(m['decode_tokens_per_s'], ',.0f')} |")
    return lines + [""]


def write_report(root: Path, price: float | None = None) -> Path:
    dirs = stage_dirs(root)
    rows = cost_rows(root, dirs, price)
    lines = [f"# nanoseek report: {root}", "", machine_line(rows), ""]
    stages = read_accuracy(root, dirs)
    if stages:
        lines += ["## Held-out accuracy by stage", "", "| stage | pass@1 | levels | families |", "|---|---|---|---|"]
        for name, s in stages.items():
            levels = ", ".join(f"L{k}: {v:.2f}" for k, v in s["levels"].items())
            families = ", ".join(f"{k}: {v:.2f}" for k, v in s["families"].items())
            lines.append(f"| {name} | {s['pass@1']:.3f} | {levels} | {families} |")
        lines.append("")
        for png in plot_accuracy(stages, root):
            lines += [f"![{png}]({png})", ""]
    models = teacher_and_student(root)
    if models:
        lines += teacher_student_table(models)
    if rows:
        lines += cost_table(rows)
    for name, d in dirs.items():
        for png in plot_training(name, read_rows(d), root):
            lines += [f"![{png}]({png})", ""]
    out = root / "report.md"
    atomic.write_text(out, "\n".join(lines))  # a full disk leaves the last report whole, not cut short
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import NONNEGATIVE

    p.add_argument("run", help="a run directory (with metrics.jsonl) or a speedrun directory; report.md and its PNG "
                   "plots are written into it, replacing an earlier report")
    p.add_argument("--price-per-hour", type=NONNEGATIVE,
                   help="dollars per device-hour (default: what each run recorded)")


def run(args: argparse.Namespace) -> int:
    from ..cli import UserError

    root = Path(args.run)
    if not root.is_dir() or not stage_dirs(root):
        raise UserError(f"{root}: no run here (expected metrics.jsonl in it or in its stage directories)")
    out = write_report(root, args.price_per_hour)
    print(json.dumps({"report": str(out)}))
    return 0
