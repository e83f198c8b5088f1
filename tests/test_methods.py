"""Methods are one module each: a method defined and registered in this file alone trains through the trainer,
and method names and backend names stay out of the code that must not know them."""

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from densessl.model.methods import METHODS, register
from densessl.model.methods.vader import Vader, VaderConfig, vader_loss
from densessl.train.config import parse
from densessl.train.trainer import run

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class UnmatchedConfig(VaderConfig):
    name: str = "unmatched"


class Unmatched(Vader):
    """The paper's Table 3 control: positives at random cells of view 1 instead of the matched ones."""

    Config = UnmatchedConfig

    def loss(self, queries, keys, queues, pairs, step):
        losses, new = [], []
        for (i, j), (matches, match_xy) in pairs.items():  # view names: pair0 and pair1, or multi-crop's views
            q = queries[i]["dense"]
            shuffled = torch.randint(0, q.shape[-2] * q.shape[-1], matches.shape, device=matches.device)
            loss, k = vader_loss(q, keys[j]["dense"], shuffled, match_xy, queues["queue_dense"],
                                 self.cfg.temperature, self.cfg.loss_scale)  # random cells as "positives"
            losses.append(loss)
            new.append(k)
        return torch.stack(losses).mean(), {}, {"queue_dense": torch.cat(new)}


def test_a_method_defined_in_one_file_trains(synthetic_root, tmp_path):
    register(Unmatched)
    try:
        cfg = parse([f"data.path={synthetic_root / 'train'}", "method.name=unmatched", "method.queue_size=256",
                     "model.arch=resnet18", "views.size=64", "views.num_matches=8", "views.min_matches=8",
                     "optim.batch_size=4", "optim.steps=2", "data.workers=0", f"run.dir={tmp_path}",
                     "run.progress=false", "run.tensorboard=false"])
        result = run(cfg)
    finally:
        METHODS.pop("unmatched")
    assert result.step == 2 and type(result.model.method) is Unmatched
    rows = (tmp_path / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and all(float(r.split(",")[2]) > 0 for r in rows)
    assert (tmp_path / "checkpoints" / "step_00000002.pt").is_file()


# Where method names and fields may appear: their own modules, the registry, the experiment presets, the tests
# and the docs. Backend names: pipeline's factory and backends, the benchmarks and the tests.
# engine_digests records every method variant's losses as a refactor's reference: it names them, as compare does
METHOD_HOMES = {"model/methods", "experiments", "benchmarks/engine_digests.py"}
BACKEND_HOMES = {"pipeline/factory.py", "pipeline/dali.py", "pipeline/ffcv.py", "pipeline/loader.py", "benchmarks"}
# "mocov2:PATH" and "torchvision/mocov2 weights" in evaluation name a checkpoint format (MoCo v2's files), not the
# method: a name followed by ":" or after "/" is a format
METHOD_WORDS = re.compile(r"(?<!/)\b(vader|densecl|mocov2|dense_weight|loss_scale|symmetric|negatives|"
                          r"exclusion_radius|positives)\b(?!:)")
BACKEND_WORDS = re.compile(r"\b(dali|ffcv)\b|backend\s*==", re.IGNORECASE)


def code_lines(path: Path):
    """``(number, line)`` of a module's code: comments, docstrings and other string statements are left out,
    since prose may name a method; string literals inside expressions stay in."""
    import ast
    source = path.read_text()
    prose = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            prose.update(range(node.lineno, node.end_lineno + 1))
    for number, line in enumerate(source.splitlines(), 1):
        code = line.split("#")[0]
        if number not in prose and code.strip():
            yield number, code


def offenders(pattern: re.Pattern, homes: set[str]) -> list[str]:
    found = []
    for folder in ("pipeline", "model", "train", "evaluation", "slurm", "benchmarks", "experiments"):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if any(rel == home or rel.startswith(home + "/") for home in homes):
                continue
            found += [f"{rel}:{n}: {line.strip()}" for n, line in code_lines(path) if pattern.search(line)]
    return found


def test_method_names_and_fields_live_in_their_own_modules():
    found = [line for line in offenders(METHOD_WORDS, METHOD_HOMES)
             if 'FOREIGN_WEIGHTS = ("torchvision", "mocov2", "timm")' not in line]  # file formats
    assert not found, "\n".join(found)


def test_backend_names_live_in_the_pipeline_factory_and_backends():
    assert not offenders(BACKEND_WORDS, BACKEND_HOMES), "\n".join(offenders(BACKEND_WORDS, BACKEND_HOMES))
