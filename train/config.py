"""Training configuration: sections, each the dataclass of the code that consumes it, composed here.

    python -m densessl.train --config my.yaml method.name=densecl model.arch=resnet50 optim.batch_size=256 \\
        data.path=/data/imagenet/train views.size=224

| section | dataclass | owner |
| --- | --- | --- |
| ``data`` | ``DataConfig`` | ``densessl.pipeline.factory`` (path, backend, workers, order) |
| ``views`` | ``PairSpec``, or ``MultiCropViews`` when ``views.crops`` is set | ``densessl.pipeline`` (the view pair and its matches; multi-crop) |
| ``model`` | ``ModelConfig`` | ``densessl.model.builder`` (architecture, initial weights, BatchNorm) |
| ``method`` | the method's own ``MethodConfig`` | ``densessl.model.methods.<name>`` (chosen by ``method.name``) |
| ``optim`` | ``OptimConfig`` | here: the optimiser and the schedule |
| ``run`` | ``RunConfig`` | here: the run folder, checkpoints, device, logging, failure handling |

Each section checks its own values when it is built; ``TrainConfig.validate`` checks the rules that tie sections
together and the machine (files, installed backends, world size), before data is scanned or a model is built. A
mistake is a ``ConfigError``: one line that names the key (``optim.lr='abc': expected a number``), printed without
a traceback. A flat key of densessl 0.1 (``view_size=224``) is refused with the name it has now.
"""

from __future__ import annotations

import difflib
import math
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import yaml

from densessl.model.builder import ModelConfig
from densessl.model.network import size_multiple
from densessl.model.vit import nearest_sizes
from densessl.model.methods import DEFAULT, METHODS, MethodConfig, method_class
from densessl.pipeline import DataConfig, PairSpec
from densessl.pipeline.views import MultiCropViews, ViewSpec


class ConfigError(ValueError):
    """A configuration mistake; its message is one line that names the key and what to change."""


@dataclass(frozen=True)
class OptimConfig:
    """SGD with momentum (or AdamW, what ViT recipes use), linear warm-up then cosine decay per step; learning
    rates are for a global batch of 256 and scale linearly with ``batch_size``."""

    batch_size: int = 256  # global, over all ranks
    epochs: int = 200
    steps: int = 0  # > 0: stop after this many steps instead of ``epochs``
    lr: float = 0.03  # encoder
    decoder_lr: float = 0.03  # heads (decoder, projections)
    warmup_steps: int = 0
    sgd_momentum: float = 0.9
    weight_decay: float = 1e-4  # on every parameter, with either optimiser
    optimizer: str = "sgd"  # sgd, or adamw (betas 0.9, 0.999; e.g. lr=5e-4 weight_decay=0.04, as DINO's ViTs)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        for name in ("epochs", "steps", "warmup_steps", "lr", "decoder_lr", "weight_decay"):
            if getattr(self, name) < 0:  # a learning rate of 0 freezes (tests, linear-probe-like runs)
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.steps == 0 and self.epochs == 0:
            raise ValueError("steps=0 and epochs=0: set epochs or steps to a positive number")
        if not 0 <= self.sgd_momentum < 1:
            raise ValueError(f"sgd_momentum={self.sgd_momentum} must be in [0, 1)")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer={self.optimizer!r}: choose sgd or adamw")


@dataclass(frozen=True)
class RunConfig:
    """The run folder and everything about how the run is carried out rather than what it learns."""

    dir: str = "runs/default"
    seed: int = 0
    resume: str = ""  # '', 'auto' (the newest checkpoint in dir, if any) or a checkpoint path
    overwrite: bool = False  # start in a dir that holds another run: its steps after the resumed one are dropped
    checkpoint_every: int = 500  # steps
    keep_checkpoints: int = 2  # newest checkpoints kept
    device: str = "auto"  # auto (the GPU of LOCAL_RANK when there is one), cuda or cpu
    amp: bool = True  # bf16 autocast on GPU
    channels_last: bool = True
    compile: bool = False
    cudnn_benchmark: bool = True  # GPU: cuDNN times its convolution algorithms once for our fixed shapes and
    # keeps the fastest (false: the default algorithms, for runs that must repeat bit for bit)
    sync_every: int = 1  # steps between host synchronisations (loss read, non-finite check, stop agreement)
    progress: bool = True  # a bar in a terminal; plain lines (every log_every steps / log_every_s) in a log file
    log_every: int = 20  # steps between plain log lines
    log_every_s: float = 60.0  # ... or seconds, whichever comes first
    tensorboard: bool = True  # TensorBoard event files in dir/tensorboard (rank 0)
    log_images_every: int = 500  # steps between pictures of the dense features in TensorBoard (and at the end)
    log_images: int = 4  # training images in those pictures (0: none)
    collective_timeout_s: int = 600  # a collective waiting longer fails, naming the ranks that fell behind
    on_nonfinite: str = "stop"  # NaN/inf loss: 'stop' (batch indices saved) or 'skip' the step (state restored)
    max_nonfinite_skips: int = 10  # with on_nonfinite=skip, one more stops the run
    max_restarts: int = 3  # Slurm: requeues after a crashed rank (signal, lost node, time-out, CUDA/NCCL error)
    max_loader_restarts: int = 3  # per epoch: a dead loader worker, replaced at the loader's position

    legacy: ClassVar[dict[str, str]] = {"run_dir": "dir"}

    def __post_init__(self):
        for name in ("checkpoint_every", "keep_checkpoints", "sync_every", "log_every", "log_images_every",
                     "collective_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("seed", "log_images", "max_nonfinite_skips", "max_restarts", "max_loader_restarts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not self.log_every_s > 0:
            raise ValueError(f"log_every_s={self.log_every_s} must be > 0")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device={self.device!r}: choose auto, cuda or cpu")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite={self.on_nonfinite!r}: choose stop or skip")


def _default_method() -> MethodConfig:
    return METHODS[DEFAULT].Config()


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    views: PairSpec | MultiCropViews = field(default_factory=PairSpec)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=_default_method)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self, world_size: int = 1) -> None:
        """The rules between sections and with this machine, each as a one-line ``ConfigError``."""
        try:
            self.data.check(world_size)
        except ValueError as err:
            raise ConfigError(f"data.{err}") from None
        if self.model.init_encoder is not None and not Path(self.model.init_encoder).is_file():
            raise ConfigError(f"model.init_encoder={self.model.init_encoder!r}: no such file")
        if self.run.resume not in ("", "auto") and not Path(self.run.resume).is_file():
            raise ConfigError(f"run.resume={self.run.resume!r}: no such checkpoint file (use auto or a path)")
        unit = size_multiple(self.model.arch)
        multiple = math.lcm(unit, self.view_spec().stride)
        for size in self.view_sizes():
            if size[0] % multiple or size[1] % multiple:
                where = (f"views.crops={self.views.crops!r}: a view of {size[0]}x{size[1]} pixels"
                         if isinstance(self.views, MultiCropViews) else f"views.size={size}")
                why = (f"{self.model.arch}'s stride 32" if unit == 32 else f"{self.model.arch}'s {unit}-pixel patch")
                raise ConfigError(f"{where}: sizes must be multiples of {multiple} ({why}, views.stride "
                                  f"{self.view_spec().stride}); nearest valid: {nearest_sizes(size[0], multiple)} x "
                                  f"{nearest_sizes(size[1], multiple)}")
        if self.optim.batch_size % world_size:
            raise ConfigError(f"optim.batch_size={self.optim.batch_size} is not divisible by the world size "
                              f"{world_size}")
        try:
            method_class(self.method.name)(self.method).check(self.view_spec(), self.optim.batch_size)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def view_spec(self) -> ViewSpec:
        """What the loader and the method take: the ``views`` section's views (a pair, or multi-crop's groups)."""
        return self.views.view_spec

    def view_sizes(self) -> list[tuple[int, int]]:
        return [g.size for g in self.view_spec().groups]


SECTIONS = {f.name: f for f in fields(TrainConfig)}


def section_class(name: str, values: dict) -> type:
    """The dataclass of section ``name``; the ``method`` section's is chosen by its ``name``, the ``views``
    section is multi-crop when it sets ``crops``."""
    if name == "views" and "crops" in values:
        return MultiCropViews
    if name == "method":
        try:
            return method_class(values.get("name", DEFAULT)).Config
        except ValueError as err:
            raise ConfigError(f"method.{err}") from None
    return SECTIONS[name].default_factory().__class__


def _renamed(flat: str) -> str | None:
    """The key a flat key of densessl 0.1 has now, if any."""
    owners = {"data": [DataConfig], "views": [PairSpec], "model": [ModelConfig], "optim": [OptimConfig],
              "run": [RunConfig], "method": list(m.Config for m in METHODS.values())}
    if flat == "objective":
        return "method.name"
    for section, classes in owners.items():
        for cls in classes:
            name = getattr(cls, "legacy", {}).get(flat, flat)
            if name in {f.name for f in fields(cls)}:
                return f"{section}.{name}"
    return None


def _expected(hint) -> str:
    """What a value of type ``hint`` looks like, for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in args if a is not type(None))
    if origin is tuple:
        kinds = {_expected(a) for a in args}
        return (f"a list of {len(args)} ({', '.join(_expected(a) for a in args)})" if len(kinds) > 1 else
                f"a list of {len(args)} {kinds.pop().removeprefix('a ')}s")
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}[hint]


def _convert(value, hint, key: str):
    """``value`` (from YAML) as type ``hint``, or a ``ConfigError`` naming ``key`` and what it expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_convert(v, a, key) for v, a in zip(value, args))
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if not isinstance(value, bool) and (isinstance(value, int) or isinstance(value, float) and value.is_integer()):
            return int(value)
    elif hint is float:
        if not isinstance(value, bool) and isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}={value!r}: expected {_expected(hint)}")


def build_section(name: str, values: dict):
    """Section ``name`` from plain values: unknown keys, wrong types and out-of-range values are one-line
    ``ConfigError``s that name ``name.key``."""
    if not isinstance(values, dict):
        renamed = _renamed(name)  # data=/path: 0.1's flat key of the same name as a section
        raise ConfigError(f"{name}: this flat key is now {renamed}" if renamed and renamed != name else
                          f"{name}={values!r}: {name} is a section; set its keys, e.g. {name}.KEY=VALUE")
    cls = section_class(name, values)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}: no such key ({_unknown_key_hint(name, cls, key, known)})")
        kwargs[key] = _convert(value, hints[key], f"{name}.{key}")
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ConfigError(f"{name}.{err}") from None


def _unknown_key_hint(name: str, cls: type, key: str, known: list[str]) -> str:
    renamed = getattr(cls, "legacy", {}).get(key)
    if renamed:
        return f"it is now {name}.{renamed}"
    if name == "method":  # another method's setting
        owners = [m for m, method in METHODS.items() if key in {f.name for f in fields(method.Config)}]
        if owners:
            return f"a setting of method.name={' or '.join(owners)}, not of method.name={cls.name}"
    if name == "views" and cls is MultiCropViews and key in {f.name for f in fields(PairSpec)}:
        return f"a setting of view pairs: with views.crops, the crops set the views; remove views.{key}"
    elsewhere = _renamed(key)
    if elsewhere and elsewhere.split(".")[0] != name:
        return f"it is {elsewhere}"
    close = difflib.get_close_matches(key, known, 1)
    return f"did you mean {name}.{close[0]}?" if close else f"{name} has {', '.join(known)}"


def from_dict(raw: dict) -> TrainConfig:
    """A ``TrainConfig`` from nested plain values (YAML), every section checked."""
    for key in raw:
        if key not in SECTIONS:
            renamed = _renamed(key)
            raise ConfigError(f"{key}: this flat key is now {renamed}" if renamed else
                              f"{key}: no such section (sections: {', '.join(SECTIONS)})")
    return TrainConfig(**{name: build_section(name, raw.get(name) or {}) for name in SECTIONS})


def with_overrides(cfg: TrainConfig, overrides: dict[str, object]) -> TrainConfig:
    """``cfg`` with ``{"section.key": value, ...}`` set, read and checked as ``parse`` reads its arguments
    (presets, sweeps). A new ``method.name`` starts that method's section from its defaults."""
    raw = to_dict(cfg)
    name = overrides.get("method.name", cfg.method.name)
    if name != cfg.method.name:
        raw["method"] = {}
    if "views.crops" in overrides and not isinstance(cfg.views, MultiCropViews):
        raw["views"] = {}  # view pairs become multi-crop views: the pair's settings do not carry over
    for key, value in overrides.items():
        section, _, field_name = key.partition(".")
        if section not in SECTIONS or not field_name:
            raise ConfigError(f"{key}: expected section.key with a section of {', '.join(SECTIONS)}")
        raw[section][field_name] = value
    return from_dict(raw)


def _merge(into: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def parse(argv: list[str] | None = None) -> TrainConfig:
    """``[--config FILE.yaml ...] [section.key=value ...]``: later sources override earlier ones; values are
    read as YAML (``[0.2, 1.0]``, ``true``, ``0.03``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(to_yaml(TrainConfig()))
        for name, method in METHODS.items():  # each method's own settings, as method.name=NAME takes them
            print(f"# method.name={name}\n" + yaml.safe_dump({"method": asdict(method.Config())}, sort_keys=False))
        raise SystemExit(0)
    raw: dict = {}
    while "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a YAML file")
        path = Path(argv[i + 1])
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"--config {path}: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a mapping of sections")
        _merge(raw, loaded)
        del argv[i:i + 2]
    for arg in argv:
        key, eq, text = arg.partition("=")
        if not eq or not key:
            raise ConfigError(f"{arg!r}: expected section.key=value")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        *sections, leaf = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {section} is a value, not a section")
        node[leaf] = value
    return from_dict(raw)


def to_dict(cfg: TrainConfig) -> dict:
    """Plain nested values (YAML, checkpoints): what ``from_dict`` reads back."""
    def plain(value):
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value
    return {name: {k: plain(v) for k, v in asdict(getattr(cfg, name)).items()} for name in SECTIONS}


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def different_training(a: TrainConfig, b: TrainConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """The keys in which two configurations train differently: every data, views, model, method and optim key
    but the loader's worker count, and the seed; not where and how a run reports (``ignore``: more keys that may
    differ, ``section.key``)."""
    da, db = to_dict(a), to_dict(b)
    for d in (da, db):  # a path is the same path however it was written
        for section, k in (("data", "path"), ("model", "init_encoder")):
            d[section][k] = d[section][k] and str(Path(d[section][k]).resolve())
    keys = [(section, k) for section in ("data", "views", "model", "method", "optim")
            for k in sorted(set(da[section]) | set(db[section]))] + [("run", "seed")]
    return [f"{section}.{k}" for section, k in keys
            if f"{section}.{k}" not in ("data.workers", *ignore) and da[section].get(k) != db[section].get(k)]
