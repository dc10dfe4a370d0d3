"""Run profiles: the one place where epochs, folds, architectures, pools and budgets are set.

* ``paper`` -- the thesis settings exactly (Schmidl 2021, §4.2, §4.3, §5.2): five secret
  architectures on MNIST, CIFAR-10 and the GTSRB 10-class subset, 5-fold CV, 20 epochs, Adam
  1e-3, batch 256; a VGG16 substitute on the downsampled-ImageNet thief pool with budgets
  2.5k/5k/10k and FGSM eps 0.25. Needs a GPU and the real datasets.
* ``demo`` -- the same protocol scaled to 2 CPU cores on the embedded offline data
  (scikit-learn digits; Fashion-MNIST when the Debian package is installed; a pool of natural
  photo patches).
* ``ci`` -- the smallest run that still exercises every code path, for tests and nbval.
* ``paper-smoke`` -- ``paper``'s grid (architectures, loaders, pool) with 2 folds, 1 epoch and
  tiny budgets, on small files in the official formats: the paper wiring proven on a CPU.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


# In PoolStudy.strategies: the extraction chapter's best strategy for the secret (stealnb.experiments.pools.best_strategy).
BEST_STRATEGY = "best"


@dataclass(frozen=True)
class PoolStudy:
    """What the "Which thief pool?" chapter runs (``notebooks/08_pools.ipynb``,
    :func:`stealnb.experiments.pools.run_pools`): each strategy on each pool, over ``seeds``, at ``budgets``;
    the rest of the loop (seed set, validation split, substitute recipe, strategy options) is the
    profile's extraction settings, so the only thing that changes between runs is the pool."""

    # Pool specs: a registered pool name, or "name+transform" (stealnb.core.data.POOL_TRANSFORMS).
    pools: tuple[str, ...] = ("natural-patches", "natural-patches+gray", "dead-leaves", "uniform-noise")
    # Datasets (and dataset-like pools) tried as cross-domain pools when present locally and not
    # the secret's own images (stealnb.core.data.check_pool). MNIST is left out: its handwritten digits
    # are the digits secret's own problem domain.
    cross_domain: tuple[str, ...] = ("fashion-mnist", "digits", "cifar10", "imagenet32")
    # "best" = the strategy with the highest mean agreement in the extraction chapter's runs at
    # its largest budget (stealnb.experiments.pools.best_strategy); ``fallback_strategy`` when those are absent.
    strategies: tuple[str, ...] = ("random", BEST_STRATEGY)
    fallback_strategy: str = "kcenter"
    budgets: tuple[int, ...] = (500,)
    seeds: tuple[int, ...] = (0,)
    round_size: int = 350  # k: with budgets (500,) one round after the seed + validation sets
    pool_size: int | None = None  # images per pool; None = the profile's pool_size
    baseline: str = "uniform-noise"  # the pool the ratios are taken to (ActiveThief's SNPD baseline)


@dataclass(frozen=True)
class CopycatSettings:
    """The attacker's problem-domain data and fine-tuning in Copycat's PDD variants
    (:class:`stealnb.extraction.copycat.CopycatConfig`). Not in the thesis text we have (its ch. 4-6 are
    missing from our copy): our choices, sized to each profile's train split."""

    pdd_size: int = 200  # problem-domain images of the train split (pdd-sl, npdd+pdd)
    finetune_epochs: int = 10  # pdd-sl fine-tuning epochs (fixed: no labelled PDD validation split)


@dataclass(frozen=True)
class DefenseSettings:
    """The defences chapter (notebook 06, :func:`stealnb.experiments.defense_experiment.run_defenses`)."""

    # attacks every defence is run against (issue 6: random, K-center, DFAL, Copycat) ...
    attacks: tuple[str, ...] = ("random", "kcenter", "dfal", "copycat")
    # ... and attacks whose streams PRADA only scans (one cheap pass, no copies to train):
    # uncertainty sampling, the ActiveThief strategy whose stream PRADA does flag
    prada_only: tuple[str, ...] = ("uncertainty",)
    prada_delta: float = 0.9  # Juuti et al. 2019's threshold on the Shapiro-Wilk W
    prada_min_queries: int = 100  # Juuti et al. 2019: W is tested once more than 100 distances are collected
    benign_clients: int = 20  # simulated benign clients per split (false positives, calibration)
    rate_deltas: tuple[float, float, float] = (0.80, 1.0, 0.0025)  # start, stop, step of the δ sweep
    server_batch: int = 20  # images per request when the streams are replayed through `stealnb serve`
    # JbDA, PRADA's positive control (Papernot et al. 2017): max(jbda_min_seeds, budget // jbda_seed_share)
    # problem-domain seeds, then rounds of x + lam * sign(gradient), each doubling the set
    jbda_rounds: int = 12
    jbda_lam: float = 0.1
    jbda_seed_share: int = 8
    jbda_min_seeds: int = 10
    admis_taus: tuple[float, ...] = (0.0, 0.5, 0.8, 0.95)  # ADMIS thresholds of the trade-off curve
    admis_nu: float = 1000.0  # steepness of ADMIS's sigmoid (Kariyappa & Qureshi 2020)
    ewe_source: int = 1  # EWE: triggered images of this class ...
    ewe_target: int = 7  # ... are classified as this one
    ewe_epochs: int = 3  # watermarking epochs on top of the trained secret
    ewe_trigger_size: int = 4  # a 4x4 white square (EWE's reference code stamps 3x3)
    ewe_trigger_position: str = "bottom-right"
    ewe_trigger_value: float = 1.0

    def with_(self, **changes) -> "DefenseSettings":
        return replace(self, **changes)


@dataclass(frozen=True)
class Profile:
    name: str
    # -- secret training (thesis §4.2 / §5.2)
    secrets: tuple[tuple[str, str], ...]  # (dataset, architecture) pairs of the grid
    folds: int
    epochs: int
    batch_size: int
    learning_rate: float
    # -- extraction (thesis §4.3 / §5.2, ActiveThief)
    substitute: str
    pool: str
    pool_size: int | None  # None = the whole pool
    seed_size: int  # |S0|, random initial labelled set
    val_size: int  # oracle-labelled validation split for early stopping (counts against budget)
    round_size: int  # k, samples selected per round
    budgets: tuple[int, ...]
    substitute_epochs: int  # the most epochs per round (raised to reach substitute_min_steps)
    patience: int  # epochs without a better validation checkpoint before a round stops
    strategies: tuple[str, ...]
    # -- the substitute's training recipe per round (also Copycat's and the replayed copies')
    substitute_batch_size: int = 50
    substitute_learning_rate: float = 1e-3
    substitute_min_steps: int = 0  # optimizer steps per round at the least (no early stop before)
    substitute_stop_loss: float | None = None  # no early stop while the training loss is above this
    substitute_monitor: str = "macro_f1"  # checkpoint selection on the validation split
    substitute_class_weight: bool = False  # loss weights balancing the stolen labels
    substitute_augment: bool = False  # query-free shifts and flips
    # The pool's images as the secret sees its own: "gray" = BT.601 luma in all three channels, for
    # secrets trained on grey images (thesis §5.1); None = as they are (stealnb.core.data.POOL_TRANSFORMS).
    pool_transform: str | None = None
    fgsm_eps: float = 0.25
    seeds: tuple[int, ...] = (0,)  # extraction seeds per (secret, strategy)
    # Per-strategy options for stealnb.extraction.selectors (e.g. DFAL's candidate cap on CPU profiles).
    strategy_options: dict = field(default_factory=dict)
    optional_secrets: tuple[tuple[str, str], ...] = field(default=())  # run when data present
    pool_study: PoolStudy = PoolStudy()  # the "Which thief pool?" chapter (notebook 08)
    copycat: CopycatSettings = CopycatSettings()  # Copycat's problem-domain variants
    defenses: DefenseSettings = DefenseSettings()  # the defences chapter
    # The secret notebook checks that the best fold's test accuracy is above this multiple of
    # chance (1 / classes): a secret that learnt nothing would make every extraction meaningless.
    secret_over_chance: float = 2.0
    # Whether the models can learn here. When they do, the notebooks check that they did: the
    # secret is above ``secret_over_chance`` (notebook 02); the misinformation model's test accuracy
    # is below chance, it changes the labels it answers (no ADMIS copy at τ > 0 equals the undefended
    # one) and the EWE secret carries its watermark more than the clean one (notebook 06). False
    # only where nothing can be learnt (paper-smoke: one epoch on noise fixture images).
    learns: bool = True
    # The training notebooks take a GPU: on a Dask cluster they run on workers started with
    # ``--resources GPU=1``, one at a time each (stealnb.report.cluster).
    gpu: bool = False
    # The results root's size after a full run of the grid, in GB, as measured (None: never
    # measured). ``stealnb run`` warns before it starts when the results' filesystem has less free
    # (stealnb.report.pipeline.disk_warning): a full disk stops a run midway (it resumes, nothing
    # paid is lost, but the hours are).
    disk_gb: float | None = None

    def substitute_fit(self) -> dict:
        """The keyword arguments of :func:`stealnb.core.train.fit` for a substitute of this profile."""
        return dict(epochs=self.substitute_epochs, patience=self.patience, batch_size=self.substitute_batch_size,
                    learning_rate=self.substitute_learning_rate, min_steps=self.substitute_min_steps,
                    stop_loss=self.substitute_stop_loss,
                    monitor=self.substitute_monitor, class_weight=self.substitute_class_weight,
                    augment=self.substitute_augment)

    @property
    def best_strategy_candidates(self) -> tuple[str, ...]:
        """The strategies that :data:`BEST_STRATEGY` picks from
        (:func:`stealnb.experiments.pools.best_strategy`): the profile's, random excluded, since
        random is the baseline the active-learning strategies are measured against. The pipeline's
        pool-study tasks wait for these strategies' runs (:func:`stealnb.report.pipeline.plan`)."""
        return tuple(s for s in self.strategies if s != "random")

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "Profile":
        """A copy with some fields changed (e.g. ``PROFILES['demo'].with_(epochs=3)``)."""
        return replace(self, **changes)


THESIS_STRATEGIES = ("random", "uncertainty", "kcenter", "dfal", "dfal+kcenter")
THESIS_ARCHS = ("vgg16", "vgg19", "alexnet", "resnet50", "resnet101")

PROFILES: dict[str, Profile] = {
    "paper": Profile(
        name="paper",
        secrets=tuple((d, a) for d in ("mnist", "cifar10", "gtsrb") for a in THESIS_ARCHS),
        folds=5,
        epochs=20,
        batch_size=256,
        learning_rate=1e-3,
        substitute="vgg16",
        pool="imagenet32",
        pool_size=120_000,  # ActiveThief's image thief set: 120k ImageNet images
        # The thesis (§4.3, §5.2) gives the budgets and FGSM eps but not the rest of the loop;
        # those values are ActiveThief's (github.com/shukla-aditya-csa/activethief, cfg.py and
        # utils/model.py train_copynet_iter), each cited:
        seed_size=500,  # cfg.py initial_seed has no default (set per run); 1/5 of the smallest budget
        val_size=1_000,  # cfg.py val_size = 1000 (oracle-labelled, counted in the budget as there)
        round_size=500,  # cfg.py k has no default (set per run); 5 rounds to 2.5k, 19 to 10k
        budgets=(2_500, 5_000, 10_000),
        substitute_epochs=1_000,  # cfg.py copy_num_epochs = 1000 (an upper bound: early stop ends it)
        patience=20,  # cfg.py early_stop_tolerance = 20 evaluations, one per epoch (copy_evaluate_every = 1)
        substitute_batch_size=50,  # cfg.py batch_size = 50
        substitute_learning_rate=1e-3,  # Adam 1e-3 as the thesis' secrets (§5.2)
        substitute_stop_loss=1.5,  # utils/model.py: no early stop while the mean training loss > 1.5
        substitute_monitor="macro_f1",  # utils/model.py: the copy's checkpoint is chosen on validation F1
        strategies=THESIS_STRATEGIES,
        seeds=(0,),
        # The pool comparison at the thesis' budgets: ActiveThief's image pool against a second
        # natural-image pool, dead-leaves and its uniform-noise baseline (Pal et al. 2020, Table 4).
        pool_study=PoolStudy(pools=("imagenet32", "natural-patches", "dead-leaves", "uniform-noise"),
                             cross_domain=("mnist", "cifar10", "gtsrb"), budgets=(2_500, 5_000, 10_000),
                             seeds=(0,), round_size=500),
        copycat=CopycatSettings(pdd_size=1_000, finetune_epochs=10),
        defenses=DefenseSettings(admis_taus=(0.0, 0.5, 0.7, 0.9, 0.95)),
        gpu=True,  # VGG16/ResNet101 secrets for 20 epochs x 5 folds: days on a CPU
    ),
    "demo": Profile(
        name="demo",
        secrets=(("digits", "cnn-small"),),
        optional_secrets=(("fashion-mnist", "cnn-small"),),
        folds=3,
        epochs=8,
        batch_size=256,
        learning_rate=1e-3,
        substitute="cnn-small",
        pool="natural-patches",
        pool_size=20_000,
        seed_size=100,
        val_size=50,
        round_size=250,
        budgets=(250, 500, 1_000),
        # ActiveThief's recipe (paper profile) scaled to 2 CPU cores: checkpoint on validation
        # macro-F1, batch 50, patience 10 epochs (ActiveThief: 20), at most 30 epochs but at least
        # 300 optimizer steps (a 100-image seed set at batch 50 is 2 steps an epoch), no early stop
        # while the training loss is above 1.5 (ActiveThief); measured in benchmarks/ (the
        # substitute-recipe calibration, results/recipe.json).
        substitute_epochs=30,
        patience=10,
        substitute_batch_size=50,
        substitute_min_steps=300,
        substitute_stop_loss=1.5,
        substitute_class_weight=True,
        strategies=THESIS_STRATEGIES,
        seeds=(0, 1, 2),
        # CPU concessions: DeepFool on 1,000 random unlabelled candidates per round, not all 20k,
        # and at most 10 DeepFool iterations (DeepFool usually converges in < 3, Moosavi-Dezfooli
        # et al. 2016; a sample that has not flipped by then ranks last, as far from the boundary).
        # Measured: with 2,000 candidates x 50 iterations the first round alone took 334 s per
        # seed (the seed-set substitute was nearly constant, so almost nothing converged).
        # DFAL+K-center scores 2 x keep_multiple x k = 2,000 candidates and K-center chooses k = 250
        # of the 1,000 DFAL keeps (stealnb.extraction.selectors.DFALKCenter).
        strategy_options={"dfal": {"max_candidates": 1_000, "max_iter": 10},
                          "dfal+kcenter": {"max_candidates": 1_000, "max_iter": 10, "keep_multiple": 4}},
        disk_gb=0.3,  # 276 MB: bench_engine's demo run of 2026-12-05 (35 tasks, Fashion-MNIST pool installed)
        # The pool chapter inside the 30-minute demo: one seed, one budget (500 queries), two
        # rounds per run (seed + validation sets, then one batch of 350); the measurement over
        # seeds at 1,000 queries is benchmarks/bench_pools.py.
        pool_study=PoolStudy(budgets=(500,), seeds=(0,), round_size=350),
    ),
    "ci": Profile(
        name="ci",
        secrets=(("digits", "cnn-tiny"),),
        folds=2,
        epochs=4,
        batch_size=128,
        learning_rate=1e-3,
        substitute="cnn-tiny",
        pool="natural-patches",
        pool_size=2_000,
        seed_size=100,
        val_size=50,
        round_size=50,
        budgets=(200, 300),
        substitute_epochs=8,
        patience=3,
        substitute_batch_size=50,
        strategies=THESIS_STRATEGIES,
        strategy_options={"dfal": {"max_candidates": 500, "max_iter": 10},
                          "dfal+kcenter": {"max_candidates": 500, "max_iter": 10, "keep_multiple": 4}},
        # Every code path of the pool chapter (a transform, a generated pool, a cross-domain
        # dataset when installed, the noise baseline), at the smallest size.
        pool_study=PoolStudy(pools=("natural-patches", "natural-patches+gray", "uniform-noise"),
                             cross_domain=("fashion-mnist",), budgets=(150, 200), seeds=(0,), round_size=50,
                             pool_size=400),
        copycat=CopycatSettings(pdd_size=50, finetune_epochs=5),
        # Every code path of the defences chapter once: an active-learning stream and Copycat's
        # (replayed, watermarked, ADMIS-answered), a PRADA-only stream, and ADMIS at tau = 0 (the
        # replay cache) and at one tau > 0. The chapter took 233 s of the 12-min ci grid with the
        # default four attacks and four taus (2026-12-03).
        defenses=DefenseSettings(attacks=("random", "copycat"), admis_taus=(0.0, 0.8)),
    ),
}

# The paper grid's wiring on a CPU (issue 17): every notebook of ``paper`` -- the same 15 secrets,
# architectures, strategies, substitute, pool and loaders -- on small files written in the
# official formats (benchmarks/bench_paper_smoke.py), with the least training that still runs
# each code path: 2 folds (cross-validation needs two), 1 epoch, one round per budget.
PROFILES["paper-smoke"] = replace(
    PROFILES["paper"],
    name="paper-smoke",
    folds=2,
    epochs=1,
    batch_size=64,
    pool_size=600,
    seed_size=20,
    val_size=10,
    round_size=20,
    budgets=(40, 60),
    substitute_epochs=1,
    patience=1,
    substitute_batch_size=32,
    substitute_stop_loss=None,
    learns=False,  # the fixture images are noise: one epoch on them learns nothing to check
    disk_gb=57.0,  # the results of bench_paper_smoke's run of 2026-12-04 (VGG/ResNet checkpoints at full size)
    copycat=CopycatSettings(pdd_size=20, finetune_epochs=1),
    # benign clients send at most budgets[-1] = 60 queries: PRADA must test before 100 of them
    defenses=replace(PROFILES["paper"].defenses, prada_min_queries=20),
    pool_study=replace(PROFILES["paper"].pool_study, budgets=(40, 60), round_size=20),
    strategy_options={"dfal": {"max_candidates": 100, "max_iter": 3},
                      "dfal+kcenter": {"max_candidates": 100, "max_iter": 3, "keep_multiple": 2}},
)


def get_profile(name: str) -> Profile:
    """The profile called ``name``. Names are resolved once, where they arrive: the command line
    (``--profile``) and the notebooks (their papermill parameter ``profile``); everything below
    takes the :class:`Profile` itself (:func:`check_profile`)."""
    try:
        return PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown profile {name!r}; expected one of: {', '.join(PROFILES)}") from None


def check_profile(profile, name: str = "profile") -> Profile:
    """``profile`` if it is a :class:`Profile`, else ``TypeError`` (a name says to resolve it with
    :func:`get_profile` first)."""
    if isinstance(profile, Profile):
        return profile
    if isinstance(profile, str):
        raise TypeError(f"{name}: expected a Profile, got the name {profile!r}; resolve it once with "
                        f"stealnb.core.profiles.get_profile({profile!r})")
    raise TypeError(f"{name}: expected a Profile, got {type(profile).__name__}")
