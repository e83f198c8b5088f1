"""timm ViT encoders (model.vit): every method on a ViT-Tiny, pairs and multi-crop, exact resumption, foreign
weights with another position grid, export into timm, and the one-line errors."""

import argparse
import re
import shutil

import pytest
import safetensors.torch
import timm
import torch
from runs import losses, tiny_args

from densessl.evaluation.features import feature_extractor
from densessl.model import checkpoint
from densessl.model.builder import ModelConfig
from densessl.model.network import build_encoder
from densessl.train.config import ConfigError, parse

VIT = "vit_tiny_patch8_224"  # ViT-Tiny with 8-pixel patches: a 64-pixel view is an 8x8 grid
MULTICROP = {"views.crops": "2x64,2x32", "views.min_cells": 16, "views.num_matches": 8, "method.queue_size": 640}


def vit_args(root, run_dir, **extra):
    """A tiny ViT run; ``views.crops`` in ``extra`` replaces the pair's views section."""
    args = tiny_args(root, run_dir, **{"model.arch": VIT, "data.workers": 0, **extra})
    if "views.crops" in extra:
        args = [a for a in args if not a.startswith("views.") or a.split("=")[0] in extra]
    return args


def test_the_pyramid_has_the_resnet_strides_and_reads_the_last_blocks_tokens():
    torch.manual_seed(0)
    encoder = build_encoder(VIT).eval()
    x = torch.randn(2, 3, 64, 96)
    feats = encoder(x)
    assert [tuple(f.shape) for f in feats] == [(2, 192, 16, 24), (2, 192, 8, 12), (2, 192, 4, 6), (2, 192, 2, 3)]
    tokens = encoder.net.forward_features(x)[:, 1:].transpose(1, 2).reshape(2, 192, 8, 12)
    assert torch.allclose(feats[1], tokens)  # stride 8 = the patch: the tokens themselves
    assert torch.allclose(feats[3], torch.nn.functional.avg_pool2d(tokens, 4), atol=1e-6)
    assert encoder.channels == (192,) * 4


def test_each_method_trains_two_steps_on_a_vit_with_pairs_and_multicrop(synthetic_root, tmp_path):
    from densessl.train.trainer import run
    for method in ("vader", "densecl", "mocov2"):
        for views in ({}, MULTICROP):
            extra = {"method.name": method, "optim.steps": 2, **views}
            name = f"{method}-{'multicrop' if views else 'pairs'}"
            if method == "densecl" and views:  # DenseCL learns from one pair: refused in one line
                with pytest.raises(ConfigError, match="method.name=densecl learns from one pair of views"):
                    parse(vit_args(synthetic_root, tmp_path / name, **extra)).validate()
                continue
            trainer = run(parse(vit_args(synthetic_root, tmp_path / name, **extra)))
            assert trainer.step == 2
            assert all(torch.isfinite(torch.tensor(v)) for v in losses(tmp_path / name).values()), name
            assert not trainer.model.shuffle_bn  # no BatchNorm: keys are encoded at once


def test_a_multicrop_vit_run_with_32_pixel_locals_resumes_exactly(synthetic_root, tmp_path):
    from densessl.train.trainer import run
    extra = {**MULTICROP, "optim.steps": 4, "run.checkpoint_every": 2}
    full = run(parse(vit_args(synthetic_root, tmp_path / "full", **extra)))
    assert full.step == 4
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "full" / "checkpoints" / "step_00000002.pt", tmp_path / "cut" / "checkpoints")
    run(parse(vit_args(synthetic_root, tmp_path / "cut", **extra, **{"run.resume": "auto"})))
    full_losses, cut_losses = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert [cut_losses[s] for s in (3, 4)] == [full_losses[s] for s in (3, 4)]


def test_timm_and_dino_state_dicts_with_another_position_grid_load_through_init_encoder(tmp_path):
    torch.manual_seed(0)
    small = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10)  # a 4x4 position grid
    state = small.state_dict()
    torch.save(state, tmp_path / "timm.pth")
    torch.save({"teacher": {f"module.backbone.{k}": v for k, v in state.items() if not k.startswith("head.")},
                "student": {}, "args": argparse.Namespace(arch="vit_tiny", patch_size=16, lr=0.0005)},
               tmp_path / "dino_checkpoint.pth")  # DINO's training checkpoint layout, its arguments included
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")  # timm's files on the Hugging Face hub
    for name in ("timm.pth", "dino_checkpoint.pth", "model.safetensors"):
        encoder = build_encoder("vit_tiny_patch16_224")
        assert encoder.net.pos_embed.shape == (1, 1 + 14 * 14, 192)
        checkpoint.load_encoder_weights(encoder, tmp_path / name)
        assert torch.equal(encoder.net.blocks[3].mlp.fc1.weight, state["blocks.3.mlp.fc1.weight"])
        assert torch.equal(encoder.net.cls_token, state["cls_token"])
        # the 4x4 grid resampled to the model's 14x14 one, as timm resamples it
        want = timm.layers.resample_abs_pos_embed(state["pos_embed"], (14, 14), num_prefix_tokens=1)
        assert torch.allclose(encoder.net.pos_embed, want)
    with pytest.raises(ValueError, match="does not fit"):
        checkpoint.load_encoder_weights(build_encoder("vit_small_patch16_224"), tmp_path / "timm.pth")
    with pytest.warns(UserWarning, match="16-pixel patch embedding is resampled to vit_tiny_patch8_224's 8 pixels"):
        checkpoint.load_encoder_weights(build_encoder(VIT), tmp_path / "timm.pth")
    with pytest.raises(ValueError, match=r"^timm:.*timm.pth: --arch='resnet50' is no timm ViT: name the file's "
                                         r"model, e.g. --arch vit_small_patch16_224 \(DINO ViT-S/16\)"):
        feature_extractor(f"timm:{tmp_path / 'timm.pth'}", "resnet50")


def test_the_decoder_reads_views_whose_sides_are_no_multiple_of_32_and_evaluation_pads_to_the_patch():
    """The FPN upsamples each level to the next finer one's grid, so a ViT's views need only be multiples of the
    patch and of the stride-4 grid (48 and 80 pixels at patch 16, 84 at patch 14); evaluation's images need not
    even be that."""
    from densessl.evaluation.features import model_extractors, random_model
    torch.manual_seed(0)
    for arch, size in (("vit_tiny_patch16_224", 48), ("vit_tiny_patch16_224", 80), ("vit_small_patch14_dinov2", 84)):
        model = random_model(arch)
        with torch.no_grad():
            assert model.encoder_q(torch.randn(1, 3, size, size))["dense"].shape == (1, 128, size // 4, size // 4)
    extractors = model_extractors(model)  # patch 14, read at 64x96 pixels
    with torch.no_grad():
        assert {k: tuple(m(torch.randn(1, 3, 64, 96)).shape[-2:]) for k, m in extractors.items()} == \
            {"hypercolumn": (16, 24), "dense": (16, 24), "c5": (16, 24)}


def test_dinov2_weights_load_with_their_own_names(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("vit_small_patch14_dinov2", num_classes=0, dynamic_img_size=True)
    state = dict(reference.state_dict())
    state["mask_token"] = torch.zeros(1, 384)  # as in DINOv2's hub files
    torch.save(state, tmp_path / "dinov2_vits14_pretrain.pth")
    encoder = build_encoder("vit_small_patch14_dinov2")
    checkpoint.load_encoder_weights(encoder, tmp_path / "dinov2_vits14_pretrain.pth")
    assert torch.equal(encoder.net.blocks[0].ls1.gamma, reference.blocks[0].ls1.gamma)
    x = torch.randn(1, 3, 98, 98)
    with torch.no_grad():
        assert torch.allclose(encoder.eval().net.forward_features(x), reference.eval().forward_features(x),
                              atol=1e-5)


def test_export_round_trips_into_timm_create_model(synthetic_root, tmp_path):
    import json

    from densessl.evaluation.export import export
    from densessl.train.trainer import run
    run(parse(vit_args(synthetic_root, tmp_path / "run", **{"optim.steps": 1})))
    written = export(tmp_path / "run", tmp_path / "out")
    assert {p.name for p in written} >= {"encoder_timm.pth", "encoder_timm.json", "decoder.pth"}
    call = json.loads((tmp_path / "out" / "encoder_timm.json").read_text())
    assert call == {"model_name": "vit_tiny_patch16_224", "kwargs": {"patch_size": 8, "num_classes": 0,
                                                                     "dynamic_img_size": True}}
    net = timm.create_model(call["model_name"], **call["kwargs"])
    net.load_state_dict(torch.load(tmp_path / "out" / "encoder_timm.pth", weights_only=True))  # strict
    model = checkpoint.load_model(tmp_path / "run")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        tokens = net.eval().forward_features(x)[:, 1:].transpose(1, 2).reshape(1, 192, 8, 8)
        assert torch.allclose(model.encoder_q.encoder(x)[1], tokens, atol=1e-5)


def test_adamw_trains_a_vit_and_its_state_resumes(synthetic_root, tmp_path):
    from densessl.train.trainer import run
    extra = {"optim.optimizer": "adamw", "optim.lr": 0.0005, "optim.decoder_lr": 0.0005, "optim.steps": 2}
    trainer = run(parse(vit_args(synthetic_root, tmp_path / "run", **extra)))
    assert trainer.step == 2
    state = checkpoint.load_file(tmp_path / "run" / "checkpoints" / "step_00000002.pt")
    assert "exp_avg_sq" in next(iter(state["optimizer"]["state"].values()))  # Adam's second moments
    with pytest.raises(ConfigError, match="optim.optimizer") as err:  # a run's optimiser is part of the run
        run(parse(vit_args(synthetic_root, tmp_path / "run", **{**extra, "optim.optimizer": "sgd",
                                                                 "optim.steps": 3, "run.resume": "auto"})))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("args,message", [
    (["optim.optimizer=adam"], "optim.optimizer='adam': choose sgd or adamw"),
    (["model.arch=vit_tiny_patch16"], "model.arch='vit_tiny_patch16': choose a ResNet .* or a timm ViT such as "
                                      "[^;]*; closest: .*vit_tiny_patch16_224"),
    (["model.arch=resnet51"], "model.arch='resnet51': choose a ResNet"),
    (["model.arch=vit_small_patch14_dinov2", "views.size=96"],
     r"views.size=.96, 96.: sizes must be multiples of 28 \(vit_small_patch14_dinov2's 14-pixel patch, "
     r"views.stride 4\); nearest valid: 84 or 112 x 84 or 112"),
    (["model.arch=vit_small_patch16_224", "views.crops=2x64,2x40"], "a view of 40x40 pixels: sizes must be "
                                                                     "multiples of 16 .*nearest valid: 32 or 48"),
])
def test_a_bad_architecture_or_view_size_is_one_line(args, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse(["optim.batch_size=256", *args]).validate()
    assert "\n" not in str(err.value)


def test_a_vit_refuses_a_view_off_its_patch_in_one_line_and_evaluation_pads():
    with pytest.raises(ValueError, match=r"^a view of 60x64 pixels is not a multiple of vit_tiny_patch8_224's "
                                         r"8-pixel patch; nearest valid sizes: 56 or 64 x 64 or 72$"):
        build_encoder(VIT)(torch.randn(1, 3, 60, 64))
    feats = build_encoder(VIT, pad=True)(torch.randn(1, 3, 60, 70))
    assert [tuple(f.shape[-2:]) for f in feats] == [(15, 17), (7, 8), (3, 4), (1, 2)]
    assert ModelConfig(arch=VIT).arch == VIT


def test_make_compare_has_vit_rows_judged_against_a_random_vit(tmp_path):
    """``make compare``'s ViT objectives at tiny size: their rows, a random ViT of each seed as their baseline,
    and their own verdict lines."""
    import json

    from densessl.experiments.compare import main
    out = tmp_path / "compare"
    assert main(["--tiny", "--objectives", "vader_vit", "mocov2_vit", "vader", "--synthetic-dir",
                 str(tmp_path / "data"), "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert set(rows) == {"VADeR ViT-Ti/8 [hypercolumn]", "VADeR ViT-Ti/8 [dense]", "MoCo v2 ViT-Ti/8 [hypercolumn]",
                         "random init ViT-Ti/8 [hypercolumn]", "random init ViT-Ti/8 [dense]", "VADeR [hypercolumn]",
                         "VADeR [dense]", "random init [hypercolumn]", "random init [dense]"}
    assert rows["VADeR ViT-Ti/8 [dense]"]["arch"] == VIT and rows["random init [dense]"]["arch"] == "resnet18"
    held = parse(["--config", str(out / "runs" / "resnet18_4steps_batch8_64px" / "vader_vit_ti_8_seed0" /
                                  "config.yaml")])
    assert held.model.arch == VIT and held.method.name == "vader"
    table = (out / "table.md").read_text()
    assert "vit_tiny_patch8_224, resnet18, 4 steps" in table
    verdicts = re.findall(r"^- (\S+): mIoU: best trained (.+?) \[\w+\] \S+ vs strongest random baseline (.+?) \[",
                          table, re.M)  # each arch's best trained row, judged against its own random network
    judged = {arch: (best, baseline) for arch, best, baseline in verdicts}
    assert "Against random init ViT-Ti/8 (" in table and "Against random init (" in table  # each its own reference
    assert len(verdicts) == 2 and judged["resnet18"] == ("VADeR", "random init")
    assert judged[VIT] in (("VADeR ViT-Ti/8", "random init ViT-Ti/8"), ("MoCo v2 ViT-Ti/8", "random init ViT-Ti/8"))


def test_the_step_benchmark_has_vit_rows_and_counts_fused_attention(capsys):
    from torch.nn import functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from densessl.benchmarks.train_step import CPU_ATTENTION, main
    q, k, v = (torch.randn(2, 3, 50, 16) for _ in range(3))
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 2 * (2 * 2 * 3 * 50 * 50 * 16)  # q k^T and (softmax) v, as two bmm's
    main(["--objectives", "vader", "--arch", f"resnet18,{VIT}", "--size", "64", "--batch", "4", "--steps", "1",
          "--warmup", "1", "--no-anchor"])
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if "GFLOP" in line}
    assert set(rows) == {"resnet18", VIT}
    assert all(float(r.split("TFLOP/s")[0].split()[-1]) > 0 for r in rows.values())


def test_evaluation_all_scores_a_vit_run_against_a_random_vit(tmp_path):
    import json

    from densessl.evaluation.__main__ import main
    from densessl.experiments.presets import TINY_DATA
    from densessl.pipeline.synthetic import generate
    from densessl.train.trainer import run
    data = generate(tmp_path / "data", TINY_DATA, progress=False)
    run(parse(vit_args(data, tmp_path / "run", **{"optim.steps": 1})))
    assert main(["all", "--checkpoint", str(tmp_path / "run"), "--root", str(data), "--probe-steps", "3",
                 "--size", "64", "96", "--depth-bound-steps", "1", "--out", str(tmp_path / "eval"), "--device",
                 "cpu"]) == 0
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())
    bound = f"supervised depth {VIT}, 1 steps (upper bound) [hypercolumn]"  # the ViT trained for depth
    assert set(rows) == {"run/step_00000001 [hypercolumn]", "run/step_00000001 [dense]", "random init [hypercolumn]",
                         "random init [dense]", "depth from position alone", bound}
    assert all(0 <= row["seg mIoU"] <= 1 for row in rows.values() if "seg mIoU" in row)
    assert all(row["depth RMSE (m)"] > 0 for row in rows.values())
