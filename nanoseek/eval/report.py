"""`nanoseek report RUN_OR_SPEEDRUN_DIR`: a report card (report.md + PNG plots) from the files runs leave behind.

Reads every stage directory it finds (a run directory has metrics.jsonl; a speedrun directory has one per stage and
a summary.json): loss curves (main and MTP), expert load imbalance per MoE layer over time, GRPO reward /
accuracy / response length, held-out accuracy by stage, by level and by family (a table and accuracy.png), and a
cost table in the style of DeepSeek-V3's (device-hours per stage, FLOPs, MFU, dollars at a configurable price), plus
the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..train.loop import read_metrics


def read_json(path: Path) -> dict:
    """A run's JSON file (cost.json, summary.json), or {} when it is missing or damaged (the report says less)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def stage_dirs(root: Path) -> dict[str, Path]:
    if (root / "metrics.jsonl").is_file():
        return {root.name: root}
    found = {}
    from ..speedrun import STAGES  # a speedrun's stages, listed in the order they ran

    order = lambda p: (STAGES.index(p.name) if p.name in STAGES else len(STAGES), p.name)  # noqa: E731
    for p in sorted(root.iterdir(), key=order):  # distill keeps its student's training run in student/
        run = next((d for d in (p, p / "student") if (d / "metrics.jsonl").is_file()), None)
        if run is not None:
            found[p.name] = run
    return found


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} × {torch.cuda.device_count()}"
    from ..device import cpu_name

    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def plot_training(name: str, rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    steps = [r["step"] for r in rows if "loss" in r]
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, [r["loss"] for r in rows if "loss" in r], label="main loss")
        if any(r.get("mtp_loss") for r in rows):
            ax.plot(steps, [r.get("mtp_loss", 0) for r in rows if "loss" in r], label="MTP loss")
        ax.set(xlabel="step", ylabel="cross-entropy", title=f"{name}: loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{name}_loss.png", dpi=110)
        plt.close(fig)
        made.append(f"{name}_loss.png")
    imb = [(r["step"], r["expert_imbalance"]) for r in rows if r.get("expert_imbalance")]
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
    rl = [r for r in rows if "reward" in r]
    if rl:
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
        for ax, key in zip(axes, ("reward", "accuracy", "response_length")):
            ax.plot([r["step"] for r in rl], [r[key] for r in rl])
            ax.set(xlabel="step", title=key)
        evals = [(r["step"], r["eval"]["pass@1"]) for r in rows if "eval" in r]
        if evals:
            axes[1].plot([s for s, _ in evals], [v for _, v in evals], "o--", label="held-out pass@1")
            axes[1].legend(fontsize=7)
        fig.suptitle(f"{name}: GRPO")
        fig.tight_layout()
        fig.savefig(out / f"{name}_rl.png", dpi=110)
        plt.close(fig)
        made.append(f"{name}_rl.png")
    return made


def plot_accuracy(stages: dict[str, dict], out: Path) -> list[str]:
    """accuracy.png: held-out pass@1 of the stages (each with a pass@1), overall and by level (left), by family
    (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not stages:
        return []
    panels = [("by level", lambda s: {"all": s["pass@1"],
                                      **{f"L{k}": v["pass@1"] for k, v in (s.get("levels") or {}).items()}})]
    if any(s.get("families") for s in stages.values()):
        panels.append(("by family", lambda s: {k: v["pass@1"] for k, v in (s.get("families") or {}).items()}))
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


def cost_rows(dirs: dict[str, Path], price: float | None) -> list[dict]:
    rows = []
    for name, d in dirs.items():
        if d.name == "student" and (d.parent / "cost.json").is_file():
            d = d.parent  # distill: its cost counts the teacher's traces as well as the student's SFT
        cost = read_json(d / "cost.json")
        if not isinstance(cost.get("device_hours"), (int, float)):  # missing or damaged: the wall-clock it logged
            metrics = read_metrics(d / "metrics.jsonl")
            wall = metrics[-1].get("wall_s", 0.0) if metrics else 0.0
            cost = {"device_hours": round(wall / 3600, 5), "flops": None, "mfu": None, "dollars": None,
                    "price_per_device_hour": price or 2.0}
        p = price if price is not None else cost.get("price_per_device_hour", 2.0)
        rows.append({"stage": name, **cost, "dollars": round(cost["device_hours"] * p, 4), "price": p})
    return rows


def write_report(root: Path, price: float | None = None) -> Path:
    dirs = stage_dirs(root)
    stages = read_json(root / "summary.json").get("stages")
    stages = {k: v for k, v in stages.items() if isinstance(v, dict) and isinstance(v.get("pass@1"), (int, float))
              } if isinstance(stages, dict) else {}
    lines = [f"# nanoseek report: {root}", "", f"Machine: {machine()}", ""]
    if stages:
        lines += ["## Held-out accuracy by stage", "", "| stage | pass@1 | levels | families |", "|---|---|---|---|"]
        for name, s in stages.items():
            levels = ", ".join(f"L{k}: {v['pass@1']:.2f}" for k, v in (s.get("levels") or {}).items())
            families = ", ".join(f"{k}: {v['pass@1']:.2f}" for k, v in (s.get("families") or {}).items())
            lines.append(f"| {name} | {s['pass@1']:.3f} | {levels} | {families} |")
        lines.append("")
        for png in plot_accuracy(stages, root):
            lines += [f"![{png}]({png})", ""]
    rows = cost_rows(dirs, price)
    if rows:
        total_h = sum(r["device_hours"] for r in rows)
        lines += ["## Cost (DeepSeek-V3 style)", "", "| stage | device-hours | FLOPs | MFU | dollars |", "|---|---|---|---|---|"]
        for r in rows:
            flops = f"{r['flops']:.3g}" if r.get("flops") else "–"
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "–"
            lines.append(f"| {r['stage']} | {r['device_hours']:.4f} | {flops} | {mfu} | ${r['dollars']:.4f} |")
        lines += [f"| **total** | {total_h:.4f} | | | ${sum(r['dollars'] for r in rows):.4f} |", "",
                  f"Dollars at ${rows[0]['price']}/device-hour (DeepSeek-V3: 2.788M H800 GPU-hours = $5.576M at $2).", ""]
    for name, d in dirs.items():
        for png in plot_training(name, read_metrics(d / "metrics.jsonl"), root):
            lines += [f"![{png}]({png})", ""]
    out = root / "report.md"
    out.write_text("\n".join(lines))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import NONNEGATIVE

    p.add_argument("run", help="a run directory (with metrics.jsonl) or a speedrun directory")
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
