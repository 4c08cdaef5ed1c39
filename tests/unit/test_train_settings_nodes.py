"""What the training settings nodes and the multi-prompt validation carry, without ComfyUI: the settings values and
the TrainConfig fields they set (training.settings), the validation plan with step 0 and several prompts, and the
families' validation samplers with a start image (k5.validation, ltx2.validation)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cinetune.core.checkpoint import read_safetensors_header, save_file_atomic
from cinetune.k5.conditioning import K5TextEmbeds
from cinetune.k5.pipeline import SizeError
from cinetune.k5.tiny import TINY_DIT_DIMS, write_tiny_vae
from cinetune.k5.vae import load_k5_vae
from cinetune.k5.validation import (K5ValidationRequest, decode_validation, encode_start_image, sample_validation,
                                    validation_size)
from cinetune.ltx2.train import ltx2_train_config
from cinetune.training.config import TrainConfig, TrainingError
from cinetune.training import runs, settings
from cinetune.training.runs import (ValidationClip, ValidationPlan, install_lora, latest_validation, latest_validations,
                                    validation_path)
from cinetune.training.settings import (CheckpointSettings, LoRASettings, OptimizerSettings, SamplingSettings,
                                        ValidationPrompt, ValidationPrompts, checked_settings, config_overrides)
from test_trainer import LTX2Harness, load_dit, sample

DEFAULTS = (OptimizerSettings(), LoRASettings(), SamplingSettings(), CheckpointSettings())


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# Settings values → TrainConfig


@pytest.mark.parametrize("build", [TrainConfig, ltx2_train_config], ids=["k5", "ltx2"])
def test_settings_nodes_at_their_defaults_leave_the_run_as_it_was(build):
    widgets = dict(rank=8, alpha=8.0, learning_rate=2e-4, lr_schedule="cosine", warmup_steps=3, max_steps=20, seed=4)
    assert build(**{**widgets, **config_overrides(*DEFAULTS)}).to_dict() == build(**widgets).to_dict()


def test_each_settings_value_lands_in_its_config_field():
    optimizer = OptimizerSettings(weight_decay=0.05, beta1=0.8, beta2=0.99, eps=1e-6, max_grad_norm=0.5,
                                  min_lr_ratio=0.1, d_coef=2.0, safeguard_warmup=True)
    lora = LoRASettings(include=(r"visual_.*",), exclude=(r".*\.1\..*",), dropout=0.1, rank_dropout=0.2,
                        module_dropout=0.3, init_lora="/somewhere/start.safetensors")
    sampling = SamplingSettings(sigma_min=0.2, sigma_max=0.9, loss_weighting="cosmap", i2v_probability=0.2)
    checkpoint = CheckpointSettings(save_every_epochs=2, keep_checkpoints=5, save_dtype="fp16", tensorboard=True,
                                    ema_decay=0.99, validation_loss_every=7, validation_loss_sigmas=(0.25, 0.75))
    cfg = TrainConfig(lr_schedule="cosine", **config_overrides(optimizer, None, lora, sampling, checkpoint))
    assert (cfg.weight_decay, cfg.betas, cfg.eps, cfg.max_grad_norm, cfg.min_lr_ratio, cfg.d_coef,
            cfg.safeguard_warmup) == (0.05, (0.8, 0.99), 1e-6, 0.5, 0.1, 2.0, True)
    assert (cfg.lora_include, cfg.lora_exclude, cfg.lora_dropout, cfg.rank_dropout, cfg.module_dropout,
            cfg.init_lora) == ((r"visual_.*",), (r".*\.1\..*",), 0.1, 0.2, 0.3, "/somewhere/start.safetensors")
    assert (cfg.sigma_min, cfg.sigma_max, cfg.loss_weighting) == (0.2, 0.9, "cosmap")
    assert cfg.i2v_prob == TrainConfig().i2v_prob  # the trainer node applies i2v_probability for its family
    assert (cfg.save_every_epochs, cfg.keep_checkpoints, cfg.save_dtype, cfg.tensorboard, cfg.ema_decay,
            cfg.validation_loss_every, cfg.validation_loss_sigmas) == (2, 5, torch.float16, True, 0.99, 7, (0.25, 0.75))
    # later settings win over earlier ones, and every field the settings set is saved with the run
    assert config_overrides(OptimizerSettings(eps=1e-3), OptimizerSettings(eps=1e-4))["eps"] == 1e-4
    saved = cfg.to_dict()
    assert saved["init_lora"] == "/somewhere/start.safetensors" and saved["validation_loss_sigmas"] == [0.25, 0.75]


def test_settings_names_stay_importable_from_runs():
    for name in settings.__all__:
        assert getattr(runs, name) is getattr(settings, name), name


def test_settings_texts_are_checked_by_the_configs_own_rules():
    assert checked_settings(lora_include="  a\\.b.*\n\n(c|d)  \n") == {"lora_include": (r"a\.b.*", "(c|d)")}
    assert checked_settings(validation_loss_sigmas="0.1, 0.5 0.9") == {"validation_loss_sigmas": (0.1, 0.5, 0.9)}
    with pytest.raises(TrainingError, match=r"lora_exclude: '\[a' is not a regular expression"):
        checked_settings(lora_exclude="ok\n[a")
    for bad in ("0.1, x", "", "1.5"):
        with pytest.raises(TrainingError, match="validation_loss_sigmas"):
            checked_settings(validation_loss_sigmas=bad)
    with pytest.raises(TrainingError, match="sigma_min .*below sigma_max"):
        SamplingSettings(sigma_min=0.6, sigma_max=0.4)
    with pytest.raises(TrainingError, match="warmup_steps=30 is longer than the run"):
        checked_settings(lr_schedule="cosine", warmup_steps=30, max_steps=10, epochs=0)


# ---------------------------------------------------------------------------------------------------------------
# Validation prompts and plan


def test_validation_prompts_chain_in_order_and_record_their_settings():
    first = ValidationPrompt("cond-a", width=0, height=64, frames=9, steps=4, guidance=3.0, seed=1,
                             extra=(("fps", 12.0), ("audio_cfg", 5.0)))
    second = ValidationPrompt("cond-b", width=96, height=32, frames=17, seed=2, start_image=torch.zeros(1, 8, 8, 3))
    chain = ValidationPrompts("ltx-2").then(first).then(second, sample_at_start=True).then(first)
    assert [p.conditioning for p in chain.prompts] == ["cond-a", "cond-b", "cond-a"]
    assert chain.sample_at_start and not ValidationPrompts("ltx-2").then(first).sample_at_start
    assert first.sized(128, 128, 25) == ValidationPrompt("cond-a", 128, 64, 9, 4, 3.0, 1, None, first.extra)
    assert first.option("audio_cfg", 7.0) == 5.0 and second.option("audio_cfg", 7.0) == 7.0
    settings = json.loads(json.dumps(chain.settings()))  # plain values only (no tensors, no conditioning)
    assert settings["sample_at_start"] is True
    assert settings["prompts"][0] == {"width": 0, "height": 64, "frames": 9, "steps": 4, "guidance": 3.0, "seed": 1,
                                      "start_image": False, "fps": 12.0, "audio_cfg": 5.0}
    assert settings["prompts"][1]["start_image"] is True


def _clip(value: float) -> ValidationClip:
    return ValidationClip(torch.full((1, 16, 16, 3), value))


def test_validation_plan_makes_one_clip_per_prompt_and_step_0_only_when_started(tmp_path):
    run = tmp_path / "run"
    assert ValidationPlan(0, at_start=True).validator(lambda s, m: [], run) is None  # only step 0: nothing in the loop
    plan = ValidationPlan.parse(3, "2", at_start=True)
    assert plan.active and plan.cadence == 1 and [s for s in range(7) if plan.due(s)] == [0, 2, 3, 6]
    assert ValidationPlan(3).start(lambda s, m: [], run, nn.Linear(1, 1)) == []  # not asked: nothing made

    rendered, written = [], []

    def render(step, model):
        rendered.append((step, model.training, torch.is_grad_enabled()))
        return [_clip(0.1 * step), _clip(0.5)]

    model = nn.Linear(2, 2).train()
    paths = plan.start(render, run, model, lambda step, path: written.append((step, path.name)))
    assert rendered == [(0, False, False)] and model.training  # eval mode and no grad while rendering, then back
    assert paths == [validation_path(run, 0, 0), validation_path(run, 0, 1)]
    assert [p.name for p in paths] == ["step_000000_p1.mp4", "step_000000_p2.mp4"]
    validate = plan.validator(render, run, lambda step, path: written.append((step, path.name)))
    for step in range(1, 4):
        validate(step, model)
    assert [s for s, *_ in rendered] == [0, 2, 3]
    assert written[-2:] == [(3, "step_000003_p1.mp4"), (3, "step_000003_p2.mp4")]
    assert latest_validations(run) == [validation_path(run, 3, 0), validation_path(run, 3, 1)]
    assert latest_validation(run) == validation_path(run, 3, 1)

    one = ValidationPlan(1).validator(lambda s, m: _clip(0.3), tmp_path / "single")
    one(1, model)  # a single clip keeps the plain name
    assert latest_validations(tmp_path / "single") == [validation_path(tmp_path / "single", 1)]
    assert latest_validations(tmp_path / "nothing") == [] and latest_validation(tmp_path / "nothing") is None


def test_the_ema_lora_installs_under_its_own_name_for_its_run(tmp_path):
    run = tmp_path / "run"
    lora = save_file_atomic({"a.lora_down.weight": torch.ones(1, 2)}, run / "lora_ema.safetensors",
                            {"cinetune.run": "mine"})
    installed = install_lora(lora, tmp_path / "loras", "mine_ema", run="mine")
    assert installed.name == "mine_ema.safetensors"
    assert read_safetensors_header(installed)[1]["cinetune.run"] == "mine"
    assert install_lora(lora, tmp_path / "loras", "mine_ema", run="mine") == installed  # its own file: replaced
    with pytest.raises(FileExistsError, match="left untouched"):
        install_lora(lora, tmp_path / "loras", "mine_ema")  # the file names run 'mine', not 'mine_ema'


# ---------------------------------------------------------------------------------------------------------------
# The families' validation samplers


@pytest.fixture(scope="module")
def k5_parts(tmp_path_factory):
    from cinetune.k5.tiny import write_tiny_dit

    folder = tmp_path_factory.mktemp("k5_validation")
    dit = load_dit(write_tiny_dit(folder / "dit.safetensors")).requires_grad_(False)
    vae = load_k5_vae(write_tiny_vae(folder / "vae.safetensors"))
    g = torch.Generator().manual_seed(3)
    embeds = lambda: K5TextEmbeds(torch.randn(1, 4, TINY_DIT_DIMS["in_text_dim"], generator=g),  # noqa: E731
                                  torch.ones(1, 4, dtype=torch.bool),
                                  torch.randn(1, TINY_DIT_DIMS["in_text_dim2"], generator=g))
    return dit, vae, {"positive": embeds(), "negative": embeds()}


def test_k5_validation_size_request_and_start_image(k5_parts):
    dit, vae, conditioning = k5_parts
    assert validation_size([sample(1, T=6, h=4, w=6), sample(2)]) == (48, 32, 17)  # first clip, at most 17 frames
    assert validation_size([sample(1, T=2, h=4, w=4)]) == (32, 32, 5)
    with pytest.raises(ValueError, match="empty"):
        validation_size([])
    K5ValidationRequest(128, 256, 5).check(nabla=True)
    with pytest.raises(SizeError, match="width 192 is not a multiple of 128 \\(NABLA"):
        K5ValidationRequest(192, 128, 5).check(nabla=True)
    with pytest.raises(SizeError, match="frames 6 is not of the form 4k\\+1"):
        K5ValidationRequest(32, 32, 6).check(nabla=False)

    request = K5ValidationRequest(32, 32, 5, steps=2, guidance=2.0, seed=7)
    image = torch.rand(1, 40, 48, 3, generator=torch.Generator().manual_seed(5))
    start = encode_start_image(vae, image, 32, 32, device="cpu")
    assert start.shape == (1, 16, 1, 4, 4)
    text_only = sample_validation(dit, conditioning, request)
    from_image = sample_validation(dit, conditioning, request, start_latent=start)
    assert text_only.shape == from_image.shape == (1, 16, 2, 4, 4)
    torch.testing.assert_close(from_image[:, :, :1], start)  # the start image is the clip's first latent frame
    assert (from_image[:, :, 1:] - text_only[:, :, 1:]).abs().max() > 1e-4  # and conditions the rest
    clip = decode_validation(vae, from_image)
    assert clip.frames.shape == (5, 32, 32, 3) and clip.fps == 24.0
    assert 0.0 <= float(clip.frames.min()) and float(clip.frames.max()) <= 1.0


def test_ltx2_validation_takes_its_guidance_and_a_start_image():
    from cinetune.ltx2.audio import LTX2AudioVAE, LTX2Vocoder
    from cinetune.ltx2.loader import LTX2VAEs
    from cinetune.ltx2.pipeline import LTX2Conditioning, LTX2Prompt
    from cinetune.ltx2.vae import LTX2VideoVAE
    from cinetune.ltx2.vae import tiny_config as tiny_vae_config
    from cinetune.ltx2.validation import encode_start_image, render_validation, validation_request

    h = LTX2Harness()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vaes = LTX2VAEs(LTX2VideoVAE.from_config(tiny_vae_config()), LTX2AudioVAE.from_config(
            LTX2AudioVAE.tiny_config()), LTX2Vocoder.from_config(LTX2Vocoder.tiny_config()))
    g = torch.Generator().manual_seed(4)
    width = h.dit_config.caption_channels
    prompt = LTX2Prompt(torch.randn(1, 6, width, generator=g), torch.randn(1, 6, width, generator=g))
    conditioning = LTX2Conditioning(prompt, LTX2Prompt(torch.zeros(1, 6, width), torch.zeros(1, 6, width)))
    model = h.model().requires_grad_(False)

    official = validation_request(96, 64, 9, 24.0, seed=3, steps=2, num_blocks=2)
    request = validation_request(96, 64, 9, 24.0, seed=3, steps=2, num_blocks=2, video_cfg=1.5, audio_cfg=2.5)
    assert (official.video_cfg, official.audio_cfg) == (3.0, 7.0)
    assert (request.video_cfg, request.audio_cfg) == (1.5, 2.5)
    image = torch.rand(1, 40, 72, 3, generator=torch.Generator().manual_seed(6))
    keyframe = encode_start_image(vaes, image, 96, 64)
    assert keyframe.latent.shape == (1, 128, 1, 2, 3) and keyframe.latent_index == 0 and keyframe.strength == 1.0
    text_only = render_validation(model, conditioning, vaes, request)
    from_image = render_validation(model, conditioning, vaes, request, keyframes=(keyframe,))
    assert from_image.frames.shape == text_only.frames.shape == (9, 64, 96, 3)
    assert (from_image.frames - text_only.frames).abs().max() > 1e-3
    guided = render_validation(model, conditioning, vaes, official)
    assert (guided.frames - text_only.frames).abs().max() > 1e-4  # the prompt's guidance is the one used
