"""What a method is: a plain list of stages and a table of arms (no registry, no base class to extend).

An arm is one way to train the segmenter (a recipe over some synthetic sets);
a stage is one step that makes what the arms train on. `segsynth run` trains
the "real" arm first (every method has it: the reference), then runs the
method's stages, then every other arm, and reports them side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Arm:
    name: str
    recipe: str  # a training recipe (segsynth.training.recipes)
    synthetic: tuple[str, ...] = ()  # names of the synthetic sets it trains on (OUT/synthetic/<name>)
    masks: str = "raw"  # raw or filtered masks of those sets
    train: tuple[tuple[str, object], ...] = ()  # other TrainConfig keys this arm sets, e.g. (("loss", "reliable"),)
    method: str = ""  # the method whose arm it is, where a run mixes methods (`--method all`); "" = the run's
    round: int = 0  # closed-loop round: 0 trains before the loop; round r after round r's stages (Method.round_stages)
    init_from: str = ""  # an arm whose checkpoint of the same seed initialises this one ("" = from scratch)
    # what a derived arm varies, for the results' sweep tables: e.g. (("sweep", "volume"), ("of", ARM), ("k", 2))
    tags: tuple[tuple[str, object], ...] = ()
    needs: str = ""  # a RunConfig key the arm needs set (e.g. target_images); without it the arm runs only if named


@dataclass
class Stage:
    """One step of a method: `action()` unless `done()` says its output is complete."""

    name: str
    action: Callable[[], object]
    done: Callable[[], bool] = lambda: False
    reads_reference: bool = False  # scores with the run's real-only segmenter, which must then be trained first


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    arms: dict[str, Arm]  # table order; "real" first
    stages: Callable  # (run context, arms to train) -> list[Stage], in order
    grids: Callable  # (run context) -> list of grid PNGs written
    presets: dict = field(default_factory=dict)  # (data kind, preset) -> run values over run.PRESETS for this method
    main_arms: tuple[str, ...] = ()  # the arms a run trains when none are named (empty: every arm)
    # (merged run values, the user's values, data kind, preset) -> run values: a method that needs more than a
    # merge of presets (`--method all` fills in each member method's sections) finishes them here
    configure: Callable | None = None
    # (run config, its arms already chosen) -> derived arms in table order (filter settings, volumes, closed-loop
    # rounds), added to the run's arms; None: the method has none
    variants: Callable | None = None
    # (run context, round r >= 1) -> the stages that make round r's data; run.py trains round r's arms after them
    round_stages: Callable | None = None

    def arm_table(self, config) -> dict[str, Arm]:
        """Every arm a run of this method can name: its table plus the arms derived from the run's settings."""
        return {**self.arms, **(self.variants(config) if self.variants else {})}

    def preset(self, kind: str, preset: str) -> dict:
        """This method's sizes for a data kind and preset; a preset it has no entry for (e.g. the toy
        "demo" of `--method all`) gets its default entry, so its generators keep their sizes."""
        return self.presets.get((kind, preset), self.presets.get((kind, "default"), {}))
