"""``fedcare privacy epsilon | noise``: the accountant, asked directly by a privacy officer."""

from __future__ import annotations

from typing import Annotated

import typer

from fedcare.cli.common import guarded, say
from fedcare.privacy.dp.accountant import AccountantKind

privacy_app = typer.Typer(
    help="Differential-privacy accounting for DP-SGD with Poisson sampling.",
    no_args_is_help=True,
)

SamplingRate = Annotated[
    float,
    typer.Option(
        "--sampling-rate", min=0.0, max=1.0, help="Poisson sampling rate q (batch / records)."
    ),
]
Steps = Annotated[int, typer.Option("--steps", min=1, help="Number of DP-SGD steps.")]
Delta = Annotated[float, typer.Option("--delta", min=0.0, max=1.0, help="Target delta.")]
Accountant = Annotated[
    AccountantKind,
    typer.Option("--accountant", help="rdp (Rényi DP), pld (privacy loss distributions), prv."),
]


@privacy_app.command("epsilon")
def privacy_epsilon(
    sampling_rate: SamplingRate,
    noise: Annotated[
        float, typer.Option("--noise-multiplier", min=0.0, help="Noise std / clipping norm.")
    ],
    steps: Steps,
    delta: Delta,
    accountant: Accountant = AccountantKind.RDP,
) -> None:
    """Print the epsilon spent by STEPS steps of DP-SGD."""
    from fedcare.privacy.dp.accountant import Mechanism, epsilon

    value = guarded(lambda: epsilon([Mechanism(sampling_rate, noise, steps)], delta, accountant))
    say(f"{value:.4f}")


@privacy_app.command("noise")
def privacy_noise(
    target: Annotated[float, typer.Option("--epsilon", min=0.0, help="Target epsilon.")],
    sampling_rate: SamplingRate,
    steps: Steps,
    delta: Delta,
    accountant: Accountant = AccountantKind.RDP,
) -> None:
    """Print the smallest noise multiplier that keeps STEPS steps within the target epsilon."""
    from fedcare.privacy.dp.accountant import noise_multiplier

    value = guarded(lambda: noise_multiplier(target, sampling_rate, steps, delta, accountant))
    say(f"{value:.4f}")
