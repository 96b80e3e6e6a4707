"""The study contract: parsing, strict validation and the content hash.

A study is what every member of a consortium signs. Sites approve a study by its
content hash, so the hash must depend on every setting and on nothing else:
not on key order, comments, whitespace or how a number was spelled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, ValidationError, model_validator

from fedcare.fixed_point import QuantizationError, plan_quantization
from fedcare.schema.features import SITE_FITTED, FeatureSchema, FeatureType, Strict
from fedcare.validation_spec import AGE_BAND, ValidationSpec
from fedcare.yamlfile import format_validation_errors, parse_yaml_model, read_yaml_model


class AccountantKind(StrEnum):
    """How a site's privacy spend is composed (docs/privacy.md)."""

    RDP = "rdp"
    PLD = "pld"
    PRV = "prv"


class StudyError(ValueError):
    """A study file that cannot be read or does not validate."""


class ModelKind(StrEnum):
    LOGISTIC_REGRESSION = "logistic_regression"
    MLP = "mlp"
    CNN = "cnn"
    MODULE = "module"


class Normalization(StrEnum):
    """The built-in CNN's normalisation layers."""

    BATCH = "batch"
    """BatchNorm: statistics over a batch (not under DP, which clips per patient)."""
    GROUP = "group"
    """GroupNorm: statistics within one image, so DP-SGD can clip per patient."""
    NONE = "none"


ENTRYPOINT = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"


class ModelSpec(Strict):
    kind: ModelKind = Field(
        default=ModelKind.LOGISTIC_REGRESSION,
        description="logistic_regression, mlp with hidden layers, cnn (images), or module: "
        "a PyTorch model each party installs (docs/models.md).",
    )
    hidden: tuple[int, ...] = Field(default=(), description="Hidden layer widths (MLP only).")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    channels: tuple[int, ...] | None = Field(
        default=None,
        description="cnn only: channels of each convolution block (default [8, 16, 32]).",
    )
    norm: Normalization | None = Field(
        default=None, description="cnn only: batch (default), group or none."
    )
    entrypoint: str | None = Field(
        default=None,
        pattern=ENTRYPOINT,
        description="module only: 'package.module:build', a function taking the input "
        "shape and returning a torch.nn.Module with one logit per row.",
    )
    source_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="module only: SHA-256 of the entrypoint module's source file; a party "
        "whose installed file differs refuses the study.",
    )

    @model_validator(mode="after")
    def _options_match_kind(self) -> Self:
        kind = self.kind
        if kind is ModelKind.MLP and not self.hidden:
            raise ValueError("an mlp needs at least one hidden layer, e.g. hidden: [32]")
        if kind is not ModelKind.MLP and self.hidden:
            raise ValueError(f"{kind} takes no hidden layers")
        if any(width < 1 for width in self.hidden):
            raise ValueError("hidden layer widths must be positive")
        if kind is not ModelKind.CNN and (self.channels is not None or self.norm is not None):
            raise ValueError("channels and norm apply to kind 'cnn' only")
        if self.channels is not None and (not self.channels or any(c < 1 for c in self.channels)):
            raise ValueError("cnn channels must be one or more positive widths")
        is_module = kind is ModelKind.MODULE
        if is_module != (self.entrypoint is not None) or is_module != (
            self.source_sha256 is not None
        ):
            raise ValueError(
                "kind 'module' needs entrypoint and source_sha256 (and they apply to it only)"
            )
        return self

    @property
    def cnn_channels(self) -> tuple[int, ...]:
        return self.channels if self.channels is not None else (8, 16, 32)

    @property
    def cnn_norm(self) -> Normalization:
        return self.norm if self.norm is not None else Normalization.BATCH


class OptimizerKind(StrEnum):
    SGD = "sgd"
    ADAM = "adam"


class TrainingSpec(Strict):
    """Local training at each site, per round."""

    epochs: int | None = Field(default=1, ge=1)
    steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=64, ge=1)
    optimizer: OptimizerKind = Field(default=OptimizerKind.SGD, description="The local optimiser.")
    learning_rate: float = Field(default=0.05, gt=0.0)
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    proximal_mu: float = Field(
        default=0.0,
        ge=0.0,
        description="FedProx: adds mu/2 * ||w - w_global||^2 to the local loss (0 = off).",
    )

    @model_validator(mode="before")
    @classmethod
    def _steps_replace_epochs(cls, data: Any) -> Any:
        # Giving steps means "not epochs"; giving both is ambiguous.
        if isinstance(data, dict) and data.get("steps") is not None:
            if data.get("epochs") is not None:
                raise ValueError("give either epochs or steps, not both")
            return {**data, "epochs": None}
        if isinstance(data, dict) and "epochs" in data and data["epochs"] is None:
            raise ValueError("give epochs or steps")
        return data


class Weighting(StrEnum):
    SAMPLES = "samples"
    EQUAL = "equal"
    SQRT = "sqrt"
    CAPPED = "capped"


class Strategy(StrEnum):
    """Server optimisers over the averaged update (Reddi et al. 2021, "Adaptive Federated
    Optimization"). FedProx is not a server strategy: it is ``training.proximal_mu``."""

    FEDAVG = "fedavg"
    FEDAVGM = "fedavgm"
    FEDADAGRAD = "fedadagrad"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"


# Server learning rates that work without tuning on the built-in cohorts and the
# heart-disease benchmark; docs/strategies.md gives the evidence.
DEFAULT_SERVER_LEARNING_RATE: dict[Strategy, float] = {
    Strategy.FEDAVG: 1.0,
    Strategy.FEDAVGM: 0.1,
    Strategy.FEDADAGRAD: 0.3,
    Strategy.FEDADAM: 0.05,
    Strategy.FEDYOGI: 0.05,
}


class RobustKind(StrEnum):
    """Aggregators that bound what a minority of bad updates can do to the mean."""

    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed_mean"
    KRUM = "krum"
    NORM_BOUND = "norm_bound"


class RobustSpec(Strict):
    """A robust aggregator in place of the weighted mean (plain aggregation only:
    docs/robust_aggregation.md)."""

    kind: RobustKind = Field(
        description="median: coordinate-wise weighted median; trimmed_mean: drop the beta "
        "share highest and lowest per coordinate; krum: Multi-Krum; norm_bound: clip each "
        "update's L2 norm at the coordinator."
    )
    beta: float = Field(
        default=0.2, ge=0.0, lt=0.5, description="trimmed_mean: share trimmed at each end."
    )
    byzantine: int = Field(
        default=1, ge=0, description="krum: how many bad updates to tolerate (f)."
    )
    select: int | None = Field(
        default=None, ge=1, description="krum: updates averaged (m; default n - f)."
    )
    max_norm: float | None = Field(
        default=None,
        gt=0.0,
        description="norm_bound: the L2 bound; default the median norm of the round's updates.",
    )

    @model_validator(mode="after")
    def _options_of_kind(self) -> Self:
        # Compared with the defaults, not the fields set: the canonical form (which
        # the content hash covers) writes every option out.
        given = {
            name
            for name in ("beta", "byzantine", "select", "max_norm")
            if getattr(self, name) != type(self).model_fields[name].default
        }
        allowed = {
            RobustKind.MEDIAN: set(),
            RobustKind.TRIMMED_MEAN: {"beta"},
            RobustKind.KRUM: {"byzantine", "select"},
            RobustKind.NORM_BOUND: {"max_norm"},
        }[self.kind]
        if extra := sorted(given - allowed):
            raise ValueError(f"robust kind '{self.kind}' takes no {', '.join(extra)}")
        return self


class AggregationSpec(Strict):
    strategy: Strategy = Strategy.FEDAVG
    weighting: Weighting = Field(
        default=Weighting.SAMPLES,
        description=(
            "Each site's weight in the average: by samples, equal, by square root of "
            "samples, or samples capped at a share."
        ),
    )
    cap: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Largest share of total weight any site may get."
    )
    server_learning_rate: float | None = Field(
        default=None, gt=0.0, description="Default depends on the strategy."
    )
    server_momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="FedAvgM's beta.")
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0, description="Adaptive first moment.")
    beta2: float = Field(default=0.99, ge=0.0, lt=1.0, description="Adam/Yogi second moment.")
    tau: float = Field(default=1e-3, gt=0.0, description="Adaptivity floor (epsilon).")
    robust: RobustSpec | None = Field(
        default=None, description="A robust aggregator in place of the weighted mean."
    )
    max_records: int = Field(
        default=1_000_000,
        ge=1,
        le=2**53,
        description="Most training records a site's update may claim; more is refused.",
    )

    @property
    def effective_learning_rate(self) -> float:
        """The server learning rate in force: the study's, or the strategy's default."""
        if self.server_learning_rate is not None:
            return self.server_learning_rate
        return DEFAULT_SERVER_LEARNING_RATE[self.strategy]

    @model_validator(mode="after")
    def _cap_with_capped(self) -> Self:
        if self.weighting is Weighting.CAPPED and self.cap is None:
            raise ValueError("weighting 'capped' needs a cap, e.g. cap: 0.4")
        if self.weighting is not Weighting.CAPPED and self.cap is not None:
            raise ValueError("cap is only used with weighting 'capped'")
        return self


class Scaling(StrEnum):
    SITE = "site"
    REFERENCE = "reference"
    NONE = "none"


class Split(StrEnum):
    KEYED = "keyed"
    STRATIFIED = "stratified"


class PreprocessingSpec(Strict):
    scaling: Scaling = Field(
        default=Scaling.SITE,
        description="site: z-score with the site's own training split; "
        "reference: each feature's agreed (mean, std); none: raw units.",
    )
    holdout_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)
    split: Split = Field(
        default=Split.KEYED,
        description="keyed: each record held out by a keyed hash of its own values (stable "
        "per record); stratified: a seeded shuffle stratified by label (a published "
        "protocol's split; not with differential privacy).",
    )
    split_seed: int | None = Field(
        default=None, ge=0, lt=2**32, description="Key of the held-out split (default: seed)."
    )


class RoundSpec(Strict):
    count: int = Field(default=20, ge=1, le=10_000)
    min_sites: int = Field(default=1, ge=1)
    fraction: float = Field(default=1.0, gt=0.0, le=1.0, description="Share of sites per round.")
    open_enrolment: bool = Field(
        default=False,
        description="Whether the operator may add a site while the study runs (it joins at "
        "the next round boundary: fedcare coordinator site add).",
    )
    deadline_s: float = Field(default=600.0, gt=0.0)
    extensions: int = Field(
        default=0,
        ge=0,
        le=10,
        description="How often a round short of min_sites at its deadline gets another "
        "deadline_s before it fails.",
    )
    inactive_after: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="Consecutive rounds a selected site may miss before it is marked "
        "inactive and no longer selected; it is active again once it next asks for work.",
    )


class ParticipationMode(StrEnum):
    SYNC = "sync"
    """Rounds: every selected site trains on the same model and the round waits for them."""
    ASYNC = "async"
    """Buffered asynchronous aggregation (FedBuff): each site trains whenever it is ready;
    the model moves on each time ``buffer`` updates have arrived."""


class StalenessKind(StrEnum):
    POLYNOMIAL = "polynomial"
    """Weight (1 + s)^-exponent for an update s model versions old."""
    CONSTANT = "constant"
    """Every accepted update counts fully, however old."""


class StalenessSpec(Strict):
    kind: StalenessKind = Field(
        default=StalenessKind.POLYNOMIAL,
        description="polynomial: weight (1 + s)^-exponent for an update s versions old; "
        "constant: weight 1.",
    )
    exponent: float = Field(
        default=0.5, ge=0.0, le=10.0, description="The polynomial's exponent a."
    )


class ParticipationSpec(Strict):
    """How sites take part: in rounds (sync, the default) or at their own pace (async)."""

    mode: ParticipationMode = Field(
        default=ParticipationMode.SYNC,
        description="sync: rounds that wait for their selected sites; async: each site "
        "trains when ready and a new model version is made from every `buffer` updates.",
    )
    buffer: int | None = Field(
        default=None,
        ge=1,
        description="Async: updates that make one new model version (K). Each site counts "
        "once per version.",
    )
    max_staleness: int = Field(
        default=10,
        ge=0,
        le=1000,
        description="Async: an update trained on a model more than this many versions old "
        "is refused.",
    )
    staleness: StalenessSpec = Field(
        default=StalenessSpec(), description="Async: how an old update is down-weighted."
    )

    @property
    def is_async(self) -> bool:
        return self.mode is ParticipationMode.ASYNC


class SecAggGraph(StrEnum):
    COMPLETE = "complete"
    SPARSE = "sparse"


class SecureAggregationSpec(Strict):
    """SecAgg+ (docs/secure_aggregation.md): the coordinator learns only the weighted sum."""

    enabled: bool = Field(
        default=False, description="SecAgg+: the coordinator sees only the sum of updates."
    )
    threshold: float = Field(
        default=0.6,
        gt=0.5,
        le=1.0,
        description="Share of a site's neighbourhood (itself included) whose shares rebuild "
        "its secrets; above one half, so two disjoint groups can never both rebuild them.",
    )
    graph: SecAggGraph = Field(
        default=SecAggGraph.COMPLETE,
        description="Who shares masks with whom: every pair, or a sparse graph.",
    )
    degree: int | None = Field(
        default=None,
        ge=2,
        description="sparse only: neighbours per site, even (default ~3 log2 n).",
    )
    bits: Literal[32, 64] = Field(
        default=32, description="Width of the ring the masked sum is computed in."
    )
    clip_norm: float | None = Field(
        default=None, gt=0.0, description="L2 bound each site clips its update delta to."
    )
    max_sites: int = Field(
        default=100, ge=2, description="Most sites in a round; sums of this many cannot wrap."
    )
    max_records: int = Field(
        default=100_000,
        ge=1,
        description="Most training records a site may weight by; weights are shares of it.",
    )
    fraction_bits: int | None = Field(
        default=None,
        ge=0,
        le=62,
        description="Fixed-point scale 2^fraction_bits (default: finest).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not self.enabled:
            return self
        if self.clip_norm is None:
            raise ValueError("secure aggregation needs clip_norm, the L2 bound of each update")
        if self.graph is SecAggGraph.COMPLETE and self.degree is not None:
            raise ValueError("degree is only used with graph 'sparse'")
        if self.degree is not None and self.degree % 2:
            raise ValueError(f"a sparse graph needs an even degree, not {self.degree}")
        try:
            plan_quantization(self.bits, self.clip_norm, self.max_sites, self.fraction_bits)
        except QuantizationError as exc:
            raise ValueError(str(exc)) from exc
        return self


class Artefact(StrEnum):
    """Kinds of information a study sends out of a site."""

    MODEL_UPDATES = "model_updates"
    METRICS = "metrics"
    COUNTS = "counts"
    DRIFT_SUMMARIES = "drift_summaries"


class DisclosureSpec(Strict):
    """What leaves each site, so a site's policy can judge the study before it runs."""

    artefacts: tuple[Artefact, ...] = Field(
        default=(Artefact.MODEL_UPDATES,), description="What each site sends out."
    )
    min_cohort_size: int = Field(
        default=10,
        ge=1,
        description="Smallest group of patients behind any released count or metric.",
    )
    min_cell_events: int = Field(
        default=3,
        ge=1,
        description="Fewest patients with, and without, the outcome in any released metric's "
        "group: a cell with one positive would describe that patient.",
    )
    coordinator_region: str | None = Field(
        default=None,
        pattern=r"^[A-Z]{2}$",
        description="Where the coordinator runs (ISO 3166 country code, or EU).",
    )


class PrivacySpec(Strict):
    """Record-level differential privacy at each site: DP-SGD (docs/privacy.md).

    With ``dp: true`` each site trains with Poisson sampling at rate
    ``training.batch_size / its training rows``, clips every row's gradient to
    ``max_grad_norm`` and adds Gaussian noise: either ``noise_multiplier`` as given,
    or the smallest one that keeps the whole study (every round) within ``epsilon``
    at ``delta`` for that site, by ``accountant``.
    """

    dp: bool = Field(default=False, description="Train with DP-SGD at every site.")
    epsilon: float | None = Field(
        default=None,
        gt=0.0,
        allow_inf_nan=False,
        description="Target epsilon per site for the study.",
    )
    delta: float | None = Field(default=None, gt=0.0, lt=1.0)
    noise_multiplier: float | None = Field(
        default=None, gt=0.0, allow_inf_nan=False, description="Noise std / max_grad_norm."
    )
    max_grad_norm: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    count_noise: float = Field(
        default=10.0,
        gt=0.0,
        allow_inf_nan=False,
        description="Std of the Gaussian noise on the record count a site reports (released "
        "once per study and charged to its ledger).",
    )
    accountant: AccountantKind = Field(
        default=AccountantKind.RDP, description="How epsilon is computed: rdp, pld or prv."
    )

    @model_validator(mode="after")
    def _complete(self) -> Self:
        given = [
            k for k in ("epsilon", "delta", "noise_multiplier") if getattr(self, k) is not None
        ]
        if not self.dp:
            if given:
                raise ValueError(f"{', '.join(given)} given but dp is off; set dp: true")
            return self
        if self.delta is None:
            raise ValueError("dp needs delta, e.g. delta: 1.0e-5 (below 1 / training rows)")
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("dp needs exactly one of epsilon (a target) or noise_multiplier")
        return self


class TrainingDriftSpec(Strict):
    """When a site counts as pulling away from the consortium during training."""

    min_cosine: float = Field(
        default=0.0,
        ge=-1.0,
        le=1.0,
        description="A round in which the cosine between a site's update and the "
        "consortium's step is below this counts against the site.",
    )
    rounds: int = Field(
        default=3, ge=1, description="That many such rounds in a row flag the site."
    )


class MonitoringSpec(Strict):
    """Drift monitoring (docs/drift.md): what each site's monitor tests at, what it
    sends, and what the coordinator does with it. Needs ``drift_summaries`` among
    ``disclosure.artefacts``."""

    alpha: float = Field(
        default=0.05,
        gt=0.0,
        lt=1.0,
        description="False-discovery rate of the monitor's tests (Benjamini-Hochberg); "
        "on data without drift the overall verdict alarms at most this often.",
    )
    permutations: int = Field(
        default=1000, ge=99, le=100_000, description="Permutations of the score-shift test."
    )
    suspend_on_gate_failure: bool = Field(
        default=True,
        description="A release whose live performance at a site fails that site's gates "
        "is marked suspended at that site in the registry.",
    )
    training: TrainingDriftSpec = TrainingDriftSpec()


class PersonalizationMethod(StrEnum):
    FINETUNE = "finetune"
    DITTO = "ditto"
    FEDBN = "fedbn"


class PersonalizationSpec(Strict):
    """A personal model at each site beside the global one (its parameters never leave
    the site): docs/personalization.md."""

    method: PersonalizationMethod = Field(
        description="finetune: local epochs from the final global model; ditto: a personal "
        "model trained every round, pulled towards that round's global model by lam; "
        "fedbn: the normalisation layers stay at each site, the rest is federated."
    )
    epochs: int = Field(
        default=5, ge=1, le=1000, description="finetune: epochs; ditto: epochs per round."
    )
    lam: float = Field(
        default=0.1, gt=0.0, le=1e4, description="ditto: strength of the pull to the global model."
    )


class Study(Strict):
    """A federated study, as declared in ``study.yaml``."""

    name: str = Field(min_length=1, max_length=200)
    description: str = Field(
        default="", description="What the study predicts, for the people who approve it."
    )
    feature_schema: FeatureSchema = Field(alias="schema")
    model: ModelSpec = Field(default=ModelSpec(), description="The model every site trains.")
    training: TrainingSpec = TrainingSpec()
    aggregation: AggregationSpec = Field(
        default=AggregationSpec(), description="How the coordinator combines the sites' updates."
    )
    preprocessing: PreprocessingSpec = Field(
        default=PreprocessingSpec(), description="Scaling and the held-out split at each site."
    )
    rounds: RoundSpec = Field(
        default=RoundSpec(),
        description="How many rounds, how many sites each needs, and deadlines.",
    )
    disclosure: DisclosureSpec = DisclosureSpec()
    validation: ValidationSpec = ValidationSpec()
    participation: ParticipationSpec = Field(
        default=ParticipationSpec(),
        description="Rounds (sync) or buffered asynchronous aggregation (async).",
    )
    secure_aggregation: SecureAggregationSpec = SecureAggregationSpec()
    privacy: PrivacySpec = PrivacySpec()
    monitoring: MonitoringSpec | None = Field(
        default=None,
        description="Drift monitoring whose summaries leave the sites; absent, a site "
        "monitors for itself and nothing about drift leaves it.",
    )
    personalization: PersonalizationSpec | None = Field(
        default=None,
        description="A personal model per site beside the global one; absent, none.",
    )
    seed: int = Field(default=0, ge=0, lt=2**32)

    @model_validator(mode="after")
    def _cap_reachable(self) -> Self:
        cap = self.aggregation.cap
        if cap is not None and cap * self.rounds.min_sites < 1.0 - 1e-12:
            # With only min_sites reporters, shares of at most `cap` could not sum to one.
            raise ValueError(
                f"aggregation.cap {cap} is below 1/rounds.min_sites "
                f"(1/{self.rounds.min_sites}); raise the cap or min_sites"
            )
        return self

    @model_validator(mode="after")
    def _model_fits_inputs(self) -> Self:
        kind = self.model.kind
        image = self.feature_schema.image
        if kind is ModelKind.CNN and image is None:
            raise ValueError("model kind 'cnn' needs an image feature in the schema")
        if image is not None and kind in (ModelKind.LOGISTIC_REGRESSION, ModelKind.MLP):
            raise ValueError(
                f"the image feature '{image.name}' needs model kind 'cnn' or 'module', not {kind}"
            )
        if image is not None and self.monitoring is not None:
            raise ValueError(
                "monitoring profiles tabular features; a study with an image feature has none"
            )
        if self.privacy.dp and kind is ModelKind.CNN and self.model.cnn_norm is Normalization.BATCH:
            raise ValueError(
                "privacy.dp clips each patient's gradient, and BatchNorm mixes the patients "
                "of a batch: use model.norm: group (or none)"
            )
        personal = self.personalization
        if (
            personal is not None
            and personal.method is PersonalizationMethod.FEDBN
            and kind in (ModelKind.LOGISTIC_REGRESSION, ModelKind.MLP)
        ):
            raise ValueError(
                f"personalization 'fedbn' keeps normalisation layers at each site; a {kind} "
                "has none (use a cnn or a module with normalisation layers)"
            )
        return self

    @model_validator(mode="after")
    def _monitoring_disclosed(self) -> Self:
        if (
            self.monitoring is not None
            and Artefact.DRIFT_SUMMARIES not in self.disclosure.artefacts
        ):
            raise ValueError(
                "monitoring sends drift summaries and training-drift figures out of each "
                "site: add drift_summaries to disclosure.artefacts"
            )
        return self

    @model_validator(mode="after")
    def _participation_consistent(self) -> Self:
        spec = self.participation
        if not spec.is_async:
            if spec.buffer is not None:
                raise ValueError(
                    "participation.buffer applies to mode 'async' only; remove it or set "
                    "participation.mode: async"
                )
            return self
        if spec.buffer is None:
            raise ValueError("participation.mode 'async' needs participation.buffer (K)")
        if spec.buffer < self.rounds.min_sites:
            raise ValueError(
                f"participation.buffer {spec.buffer} is below rounds.min_sites "
                f"{self.rounds.min_sites}: no version could ever be made"
            )
        if self.rounds.fraction < 1.0:
            raise ValueError(
                "rounds.fraction selects sites for synchronous rounds; in async mode every "
                "active site takes part at its own pace: remove it"
            )
        return self

    @model_validator(mode="after")
    def _secure_aggregation_fits(self) -> Self:
        secure = self.secure_aggregation
        if not secure.enabled:
            return self
        if self.aggregation.weighting is Weighting.CAPPED:
            raise ValueError(
                "secure aggregation cannot use weighting 'capped': capping needs every site's "
                "count, which the coordinator no longer sees; use samples, sqrt or equal"
            )
        if self.aggregation.robust is not None:
            raise ValueError(
                "aggregation.robust needs every site's update, which secure aggregation "
                "hides; under secure aggregation the sum's norm is bounded instead "
                "(docs/robust_aggregation.md)"
            )
        if self.rounds.min_sites < 2:
            raise ValueError("secure aggregation needs rounds.min_sites of at least 2")
        if secure.max_sites < self.rounds.min_sites:
            raise ValueError(
                f"secure_aggregation.max_sites {secure.max_sites} is below rounds.min_sites "
                f"{self.rounds.min_sites}"
            )
        return self

    @model_validator(mode="after")
    def _dp_sees_only_public_preprocessing(self) -> Self:
        """Under DP nothing that shapes the training rows may be fitted on them."""
        if not self.privacy.dp:
            return self
        prep = self.preprocessing
        if prep.scaling is Scaling.SITE:
            raise ValueError(
                "privacy.dp needs preprocessing.scaling 'reference' or 'none': 'site' fits "
                "each feature's mean and std on the site's rows, outside the privacy accountant"
            )
        if prep.split is Split.STRATIFIED:
            raise ValueError(
                "privacy.dp needs preprocessing.split 'keyed': a shuffled split moves other "
                "patients between training and held-out data when one record changes"
            )
        fitted = [f.name for f in self.feature_schema.features if f.missing.rule in SITE_FITTED]
        if fitted:
            raise ValueError(
                "privacy.dp needs declared fill values: the missing rule of "
                + ", ".join(fitted)
                + " is fitted on the site's rows; use missing: {rule: value, fill: <value>}"
            )
        return self

    @model_validator(mode="after")
    def _reference_scaling_complete(self) -> Self:
        if self.preprocessing.scaling is Scaling.REFERENCE:
            missing = [
                f.name
                for f in self.feature_schema.features
                if f.type is FeatureType.CONTINUOUS and f.reference is None
            ]
            if missing:
                raise ValueError(
                    "scaling 'reference' needs reference: [mean, std] on " + ", ".join(missing)
                )
        return self

    @model_validator(mode="after")
    def _subgroups_exist(self) -> Self:
        schema = self.feature_schema
        allowed = {a.name for a in schema.attributes} | {
            f.name
            for f in schema.features
            if f.type in (FeatureType.BINARY, FeatureType.CATEGORICAL)
        }
        if "age" in {f.name for f in schema.features} | {a.name for a in schema.attributes}:
            allowed.add(AGE_BAND)
        spec = self.validation
        unknown = [name for name in spec.subgroups if name not in allowed]
        if unknown:
            raise ValueError(
                f"validation.subgroups: {', '.join(unknown)} is not an attribute, a binary or "
                f"categorical feature, or age_band (with an 'age' feature); "
                f"choose from {', '.join(sorted(allowed)) or 'none'}"
            )
        for gate in spec.gates:
            if gate.attribute is not None and gate.attribute not in spec.subgroups:
                raise ValueError(
                    f"validation.gates: attribute '{gate.attribute}' is not in "
                    "validation.subgroups, so no site would report it"
                )
        return self

    @property
    def validates_releases(self) -> bool:
        """Whether sites validate candidate releases: their reports are metrics, so only
        a study that declares metrics among what leaves a site asks for them."""
        return Artefact.METRICS in self.disclosure.artefacts

    def canonical(self) -> dict[str, Any]:
        """The fully resolved settings, defaults included, as plain JSON types."""
        return self.model_dump(mode="json", by_alias=True)

    @cached_property
    def content_hash(self) -> str:
        """SHA-256 over the canonical JSON form: stable under formatting, sensitive to settings.

        Computed once per (frozen) study: every message of every round names it."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy (pydantic's), whose content hash is computed afresh: a copy with
        changed settings must never carry the original's hash."""
        copy = super().model_copy(update=update, deep=deep)
        copy.__dict__.pop("content_hash", None)
        return copy

    def replace(self, **changes: Any) -> Study:
        """A copy with top-level sections replaced, validated like a fresh file."""
        data = self.canonical()
        for key, value in changes.items():
            data[key] = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
        try:
            return Study.model_validate(data)
        except ValidationError as exc:
            raise StudyError(format_validation_errors(exc, "the changed study", "study")) from exc


def parse_study(text: str, source: str = "<study>") -> Study:
    """Parse and validate a study from YAML text."""
    return parse_yaml_model(text, Study, source, "study", StudyError)


def load_study(path: Path) -> Study:
    """Read and validate ``study.yaml``."""
    return read_yaml_model(path, Study, "study file", StudyError)
