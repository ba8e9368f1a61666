"""Stability maps of round-robin EASGD and ADMM on F(x) = x^2/2 (the paper's Section 4, Figure 1).

The spectral radius of one round of updates (built from the library's own update functions) over
a grid: EASGD over (eta, alpha) with the analytic boundary alpha = (4 - 2 eta) / (4 - eta) drawn on
it, for p = 1, 3, 8; ADMM over eta in (0, 0.01), rho in (0, 10) for p = 3 and 8.

    python benchmarks/stability.py            # full grid (about a minute)
    python benchmarks/stability.py --quick    # coarse grid (seconds)

Writes results/stability.csv (method,p,lr,moving_rate_or_rho,spectral_radius,stable) and PNG maps.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import parser, suffix, write_csv, write_json  # noqa: E402

from easgd.sim.stability import (  # noqa: E402
    admm_round_robin_map,
    easgd_round_robin_map,
    easgd_stable_analytic,
    spectral_radius,
)


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    torch.set_num_threads(1)
    n = 16 if args.quick else 48
    rows = []
    etas = np.linspace(0.02, 2.4, n)
    alphas = np.linspace(0.01, 0.99, n)
    fig, axes = plt.subplots(1, 5, figsize=(22, 4.2))
    agreement = {}
    for ax, p in zip(axes[:3], (1, 3, 8), strict=True):
        radius = np.zeros((n, n))
        agree = 0
        for i, alpha in enumerate(alphas):
            for j, eta in enumerate(etas):
                r = spectral_radius(easgd_round_robin_map(float(eta), float(alpha), p))
                radius[i, j] = r
                stable = r <= 1.0 + 1e-9
                agree += stable == easgd_stable_analytic(float(eta), float(alpha))
                rows.append(
                    {
                        "method": "easgd",
                        "p": p,
                        "lr": eta,
                        "moving_rate_or_rho": alpha,
                        "spectral_radius": r,
                        "stable": stable,
                    }
                )
        agreement[f"easgd_p{p}"] = agree / n**2
        image = ax.pcolormesh(etas, alphas, np.minimum(radius, 1.5), shading="auto", cmap="viridis")
        ax.contour(etas, alphas, radius, levels=[1.0], colors="white", linewidths=1.5)
        edge = np.linspace(0.0, 2.0, 200)
        ax.plot(edge, (4 - 2 * edge) / (4 - edge), "r--", label="(4-2 eta)/(4-eta)")
        ax.axvline(2.0, color="r", linestyle="--")
        ax.set(
            title=f"EASGD round-robin, p={p}",
            xlabel="eta (learning rate)",
            ylabel="alpha (moving rate)",
            ylim=(0, 1),
        )
        ax.legend(fontsize=7, loc="upper right")
        fig.colorbar(image, ax=ax, label="spectral radius (clipped 1.5)")
    admm_etas = np.linspace(1e-4, 0.01, n)
    rhos = np.linspace(0.1, 10.0, n)
    for ax, p in zip(axes[3:], (3, 8), strict=True):
        radius = np.zeros((n, n))
        for i, rho in enumerate(rhos):
            for j, eta in enumerate(admm_etas):
                r = spectral_radius(admm_round_robin_map(float(eta), float(rho), p))
                radius[i, j] = r
                rows.append(
                    {
                        "method": "admm",
                        "p": p,
                        "lr": eta,
                        "moving_rate_or_rho": rho,
                        "spectral_radius": r,
                        "stable": r <= 1.0 + 1e-9,
                    }
                )
        agreement[f"admm_p{p}_unstable_fraction"] = float((radius > 1.0 + 1e-9).mean())
        image = ax.pcolormesh(admm_etas, rhos, radius, shading="auto", cmap="magma")
        ax.contour(admm_etas, rhos, radius, levels=[1.0], colors="cyan", linewidths=1.5)
        ax.set(title=f"ADMM round-robin, p={p} (cyan: radius 1)", xlabel="eta", ylabel="rho")
        fig.colorbar(image, ax=ax, label="spectral radius")
    fig.tight_layout()
    tag = suffix(args.quick)
    fig.savefig(args.out / f"stability{tag}.png", dpi=110)
    write_csv(args.out / f"stability{tag}.csv", rows)
    example = {
        f"p{p}": {
            "admm_radius": spectral_radius(admm_round_robin_map(0.001, 2.5, p)),
            "easgd_radius_alpha_eta_rho": spectral_radius(easgd_round_robin_map(0.001, 0.0025, p)),
        }
        for p in (3, 8)
    }
    write_json(
        args.out / f"stability{tag}.json",
        {"grid": n, "agreement_with_analytic": agreement, "paper_example_eta0.001_rho2.5": example},
    )
    print(
        "EASGD: share of grid points where the spectral radius agrees with the analytic condition:"
    )
    for key, value in agreement.items():
        print(f"  {key}: {value:.4f}")
    print("Paper example eta=0.001, rho=2.5:", example)


if __name__ == "__main__":
    main()
