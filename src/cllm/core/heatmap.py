"""The layers x columns heat map of a sensitivity map, apart from the measuring code so that
drawing one (`cllm report`) does not import torch."""

from __future__ import annotations

from typing import Any

import numpy as np


def heatmap(kld: list[list[float]], columns: list[str], xlabel: str, title: str, path: Any) -> None:
    """Layers x columns heat map of log10 KLD (matplotlib, imported only here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = len(kld)
    data = np.log10(np.maximum(np.array(kld), 1e-8))
    fig, ax = plt.subplots(figsize=(max(5.0, 2 + 1.1 * len(columns)), 1.5 + 0.22 * n_layers))
    im = ax.imshow(data, aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9, wrap=True)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
