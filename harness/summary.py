"""The demo's figures: counts, accuracy against the ground truth, image AUROC, throughput, latency."""

from pathlib import Path

import numpy as np

from harness.replay import Run
from harness.samples import Sample


def image_auroc(scores: np.ndarray, defective: np.ndarray) -> float | None:
    """Probability that a defective image scores above a good one (ties count half): the area
    under the ROC curve. None unless both kinds are present."""
    positives, negatives = scores[defective], scores[~defective]
    if not len(positives) or not len(negatives):
        return None
    above = positives[:, None] > negatives[None, :]
    tied = positives[:, None] == negatives[None, :]
    return float(above.mean() + 0.5 * tied.mean())


def summarise(samples: list[Sample], run: Run, broker_name: str, out: Path) -> dict:
    """What summary.json holds: the counts and figures of the table, and one entry per verdict."""
    pairs = [(samples[i], run.results[i]) for i in sorted(run.results)]
    results = [result for _, result in pairs]
    right = [sample.judged_right(result) for sample, result in pairs]
    latencies = [result.latency_ms.total for result in results]
    p50, p99 = (float(v) for v in np.percentile(latencies, [50, 99])) if results else (None, None)
    return {
        "frames": len(samples),
        "frames_sent": run.sent,
        "results": len(results),
        "pass": sum(result.verdict == "pass" for result in results),
        "fail": sum(result.verdict == "fail" for result in results),
        "correct": sum(right),
        "accuracy": sum(right) / len(results) if results else None,
        # A null score (the model's output was not finite) ranks as the most anomalous: it is a fail.
        "image_auroc": image_auroc(np.array([np.inf if result.score is None else result.score for result in results]),
                                   np.array([sample.defective for sample, _ in pairs], dtype=bool)),
        "throughput_fps": len(results) / run.seconds if run.seconds > 0 else None,
        "latency_ms": {"p50": p50, "p99": p99},
        "broker": broker_name,
        "model": results[0].model.model_dump() if results else None,
        "overlays": str(out),
        "per_frame": [{"image": sample.name, "truth": sample.truth, "frame_id": result.frame_id,
                       "verdict": result.verdict, "score": result.score, "threshold": result.threshold,
                       "latency_ms": result.latency_ms.total, "correct": ok, "overlay": sample.overlay_name}
                      for (sample, result), ok in zip(pairs, right)],
    }


def print_summary(summary: dict, wall_s: float) -> None:
    def number(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    latency = summary["latency_ms"]
    rows = [
        ("frames sent / results", f"{summary['frames_sent'] if summary['frames_sent'] is not None else '?'}"
                                  f" / {summary['results']}  (of {summary['frames']})"),
        ("verdicts", f"pass {summary['pass']}  fail {summary['fail']}"),
        ("accuracy vs ground truth", f"{number(summary['accuracy'], '.1%')}  ({summary['correct']} right)"),
        ("image AUROC", number(summary["image_auroc"], ".3f")),
        ("throughput", f"{number(summary['throughput_fps'], '.2f')} frames/s"),
        ("latency total p50 / p99", f"{number(latency['p50'], '.1f')} / {number(latency['p99'], '.1f')} ms"),
        ("broker", summary["broker"]),
        ("pictures", f"{summary['overlays']}/  (one PNG per frame, summary.json, daemon.log)"),
        ("demo wall time", f"{wall_s:.1f} s"),
    ]
    print("\n── demo summary " + "─" * 55)
    for label, value in rows:
        print(f"  {label:<26} {value}")
