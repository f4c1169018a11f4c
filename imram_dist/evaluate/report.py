"""--report DIR: the top-5 retrieved items for a sample of queries, as JSON and markdown."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imram_dist.data.io import atomic_write_bytes

TOP = 5


def _top(scores: np.ndarray, k: int = TOP) -> np.ndarray:
    """Indices of the k highest scores, best first; equal scores in index order."""
    k = min(k, scores.shape[0])
    order = np.lexsort((np.arange(scores.shape[0]), -scores.astype(np.float64)))
    return order[:k]


def build_report(sims: Any, caption_to_image: np.ndarray, image_ids: Sequence[Any] | None,
                 captions: Sequence[str] | None, n_queries: int = 20, seed: int = 0,
                 image_offset: int = 0, caption_offset: int = 0) -> dict[str, Any]:
    """Sampled image->text and text->image queries with their top-5 results.
    Indices in the output are split-global (offsets added, for coco1k folds)."""
    n, m = sims.shape
    rng = np.random.default_rng(seed)
    img_q = np.sort(rng.choice(n, size=min(n_queries, n), replace=False))
    cap_q = np.sort(rng.choice(m, size=min(n_queries, m), replace=False))

    def img_id(i: int) -> Any:
        gi = i + image_offset
        return str(image_ids[gi]) if image_ids is not None and len(image_ids) > gi else str(gi)

    def cap_text(j: int) -> str | None:
        gj = j + caption_offset
        return str(captions[gj]) if captions is not None and len(captions) > gj else None

    i2t = []
    for i in img_q:
        row = np.asarray(sims[i])
        own = set(np.flatnonzero(caption_to_image == i).tolist())
        i2t.append({
            "image": int(i + image_offset), "image_id": img_id(int(i)),
            "ground_truth": [{"caption": int(j + caption_offset), "text": cap_text(j)} for j in sorted(own)],
            "top": [{"caption": int(j + caption_offset), "text": cap_text(int(j)), "score": float(row[j]),
                     "correct": int(j) in own} for j in _top(row)],
        })
    t2i = []
    for j in cap_q:
        col = np.asarray(sims[:, j])
        gt = int(caption_to_image[j])
        t2i.append({
            "caption": int(j + caption_offset), "text": cap_text(int(j)),
            "ground_truth": {"image": gt + image_offset, "image_id": img_id(gt)},
            "top": [{"image": int(i + image_offset), "image_id": img_id(int(i)), "score": float(col[i]),
                     "correct": int(i) == gt} for i in _top(col)],
        })
    return {"image_to_text": i2t, "text_to_image": t2i}


def _md(report: dict[str, Any], title: str) -> str:
    out = [f"# {title}", "", "## Image -> text", ""]
    for q in report["image_to_text"]:
        out.append(f"### image {q['image']} (id {q['image_id']})")
        for gt in q["ground_truth"]:
            out.append(f"- ground truth: #{gt['caption']} {gt['text'] or ''}")
        out.append("")
        out.append("| rank | caption | score | correct | text |")
        out.append("|---|---|---|---|---|")
        for r, t in enumerate(q["top"], 1):
            text = (t["text"] or "").replace("|", "\\|")
            out.append(f"| {r} | {t['caption']} | {t['score']:.4f} | {'yes' if t['correct'] else ''} | {text} |")
        out.append("")
    out += ["## Text -> image", ""]
    for q in report["text_to_image"]:
        gt = q["ground_truth"]
        out.append(f"### caption {q['caption']}: {q['text'] or ''}")
        out.append(f"- ground truth: image {gt['image']} (id {gt['image_id']})")
        out.append("")
        out.append("| rank | image | id | score | correct |")
        out.append("|---|---|---|---|---|")
        for r, t in enumerate(q["top"], 1):
            out.append(f"| {r} | {t['image']} | {t['image_id']} | {t['score']:.4f} | {'yes' if t['correct'] else ''} |")
        out.append("")
    return "\n".join(out)


def write_report(out_dir: str | Path, report: dict[str, Any], summary: dict[str, Any],
                 title: str = "Retrieval report") -> list[Path]:
    """report.json (summary + queries) and report.md under out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "report.json", out_dir / "report.md"
    atomic_write_bytes(js, json.dumps({"summary": summary, **report}, indent=2).encode())
    atomic_write_bytes(md, _md(report, title).encode())
    return [js, md]
