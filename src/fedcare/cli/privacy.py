"""``fedcare privacy epsilon | noise``: the accountant, asked directly by a privacy officer."""

from __future__ import annotations

from typing import Annotated

import typer

from fedcare.cli.common import guarded, say
from fedcare.privacy.dp.accountant import AccountantKind, AccountingError

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


@privacy_app.command("audit")
def privacy_audit(
    target: Annotated[
        float, typer.Option("--epsilon", min=0.0, help="The epsilon DP-SGD claims.")
    ] = 4.0,
    delta: Delta = 1e-5,
    canaries: Annotated[int, typer.Option(min=10, help="Canaries (half go in, at random).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the data and of which canaries go in.")] = 0,
) -> None:
    """Empirical audit in one training run (Steinke, Nasr, Jagielski 2023): a lower bound
    on the epsilon DP-SGD achieves, beside a control run without noise."""
    from fedcare.privacy.audit import AuditResult, AuditSettings

    def run() -> AuditResult:
        try:
            import jax_privacy.auditing  # noqa: F401  (the published auditor)

            from fedcare.privacy.audit import run_audit
        except ImportError as exc:
            raise AccountingError(
                "the audit needs Google's jax-privacy: pip install 'fedcare[audit]'"
            ) from exc
        settings = AuditSettings(claimed_epsilon=target, delta=delta, canaries=canaries, seed=seed)
        return run_audit(settings)

    result = guarded(run)
    s = result.settings
    say(
        f"{s.canaries} canaries, {result.dp.included} in; {s.steps} DP-SGD steps, "
        f"expected batch {s.batch_size}, clipping {s.max_grad_norm:g}; "
        f"significance {s.significance:g}"
    )
    say(
        f"claimed epsilon {s.claimed_epsilon:g} at delta {s.delta:g} (accountant: "
        f"{result.accounted_epsilon:.4f} with noise multiplier {result.dp.noise_multiplier:.4f})"
    )
    say(f"{'run':<18}{'epsilon lower bound':>22}{'attack AUROC':>14}")
    for name, audit in (("DP-SGD", result.dp), ("control (no noise)", result.control)):
        say(f"{name:<18}{audit.epsilon_lower_bound:>22.4f}{audit.attack_auroc:>14.3f}")
    below = result.dp.epsilon_lower_bound <= s.claimed_epsilon
    say(f"DP-SGD lower bound {'below' if below else 'ABOVE'} the claimed epsilon")
