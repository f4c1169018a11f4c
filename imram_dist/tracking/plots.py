"""Training curves as a PNG (loss and dev rsum per epoch) for a run's artifacts."""

from __future__ import annotations

import io
from typing import Any


def curves_png(history: list[dict[str, Any]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_rsum) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    ax_loss.plot(epochs, [h.get("loss", float("nan")) for h in history], "o-", color="tab:red")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="loss")
    ax_rsum.plot(epochs, [h.get("rsum", float("nan")) for h in history], "o-", color="tab:blue")
    ax_rsum.set(xlabel="epoch", ylabel="dev rsum", title="dev rsum (max 600)")
    for ax in (ax_loss, ax_rsum):
        ax.grid(alpha=0.3)
        ax.set_xticks(epochs)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
