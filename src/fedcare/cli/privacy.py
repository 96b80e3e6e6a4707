"""``fedcare privacy epsilon | noise``: the accountant, asked directly by a privacy officer."""

from __future__ import annotations

from typing import Annotated

import typer

from fedcare.cli.common import guarded, say
from fedcare.study import AccountantKind

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
        float, typer.Option("--epsilon", min=0.0, help="The epsilon the planned run claims.")
    ] = 4.0,
    delta: Delta = 1e-5,
    sampling_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="The planned run's Poisson rate.")
    ] = 0.1,
    steps: Annotated[int, typer.Option(min=1, help="The planned run's DP-SGD steps.")] = 200,
    canaries: Annotated[int, typer.Option(min=10, help="Canaries per run (half go in).")] = 4000,
    runs: Annotated[int, typer.Option(min=1, help="Audited steps, each with fresh noise.")] = 25,
    noise_divisor: Annotated[
        float,
        typer.Option(
            min=1.0, help="Run the code with this much less noise than planned (to see it caught)."
        ),
    ] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the data and of which canaries go in.")] = 0,
) -> None:
    """White-box audit of the noisy gradient step: lower bounds on the step's and the
    planned run's epsilon, from canaries observed through fedcare's own DP-SGD."""
    from fedcare.privacy.audit import AuditResult, AuditSettings, run_audit

    def run() -> AuditResult:
        settings = AuditSettings(
            claimed_epsilon=target,
            delta=delta,
            sampling_rate=sampling_rate,
            steps=steps,
            canaries=canaries,
            runs=runs,
            seed=seed,
        )
        return run_audit(settings, noise_divisor=noise_divisor)

    result = guarded(run)
    s = result.settings
    say(
        f"claimed epsilon {s.claimed_epsilon:g} at delta {s.delta:g}: {s.steps} steps at rate "
        f"{s.sampling_rate:g}, noise multiplier {result.noise_multiplier:.4f} (PLD), "
        f"clipping {s.max_grad_norm:g}"
    )
    if result.noise_divisor != 1.0:
        say(f"the code runs with the noise divided by {result.noise_divisor:g}")
    say(
        f"{result.observations} observations of the step ({s.runs} runs x {s.canaries} "
        f"canaries); significance {s.significance:g}"
    )
    say(
        f"noise multiplier seen {result.estimated_noise_multiplier:.4f} "
        f"(at most {result.noise_multiplier_upper:.4f})"
    )
    say(f"{'bound':<34}{'lower bound':>12}{'claim':>10}")
    say(
        f"{'one step, no sampling':<34}{result.step_lower_bound:>12.4f}{result.step_epsilon:>10.4f}"
    )
    say(
        f"{'the planned run (Gaussian noise)':<34}{result.run_lower_bound:>12.4f}"
        f"{s.claimed_epsilon:>10.4g}"
    )
    say("CAUGHT: the code adds less noise than claimed" if result.caught else "passed")
    if result.caught:
        raise typer.Exit(code=1)
