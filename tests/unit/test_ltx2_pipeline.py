"""LTX-2 generation stage (ltx2.pipeline): shapes, noise determinism, image conditioning, modes, stage 2 and input
errors, on a tiny random DiT."""

from __future__ import annotations

import pytest
import torch

from cinetune.ltx2 import pipeline
from cinetune.ltx2.config import LTX2TransformerConfig, tiny_transformer_metadata
from cinetune.ltx2.dit import LTX2DiT, patchify_video
from cinetune.ltx2.pipeline import Keyframe, LTX2Conditioning, LTX2Prompt, SamplingRequest, SizeError, generate

W, H, F, FPS = 128, 64, 9, 24.0


@pytest.fixture(scope="module")
def dit() -> LTX2DiT:
    torch.manual_seed(0)
    return LTX2DiT(LTX2TransformerConfig.from_metadata(tiny_transformer_metadata())).eval()


def _prompt(seed: int) -> LTX2Prompt:
    g = torch.Generator().manual_seed(seed)
    return LTX2Prompt(torch.randn(1, 16, 24, generator=g), torch.randn(1, 16, 24, generator=g))


COND = LTX2Conditioning(_prompt(1), _prompt(2))


class CountingDiT(torch.nn.Module):
    """Wraps the DiT and records every call's skip settings."""

    def __init__(self, dit):
        super().__init__()
        self.dit, self.calls = dit, []

    def forward(self, *args, **kwargs):
        self.calls.append((kwargs["skip_self_attn_blocks"], kwargs["skip_cross_modal"]))
        return self.dit(*args, **kwargs)


def _request(**kw) -> SamplingRequest:
    return SamplingRequest(**{"width": W, "height": H, "frames": F, "fps": FPS, "seed": 3, "steps": 2, "stg_block": 1, **kw})


def test_text_to_video_shapes_and_seed_determinism(dit):
    with torch.inference_mode():
        video, audio = generate(dit, COND, _request(stg=0.0))
        again, audio_again = generate(dit, COND, _request(stg=0.0))
        other, _ = generate(dit, COND, _request(stg=0.0, seed=4))
    assert video.shape == (1, 128, 2, H // 32, W // 32) and video.dtype == torch.float32
    assert audio.shape == (1, 8, round(F / FPS * 25), 16)
    assert torch.equal(video, again) and torch.equal(audio, audio_again)
    assert not torch.allclose(video, other)
    assert torch.isfinite(video).all() and torch.isfinite(audio).all()


def test_model_calls_per_step_follow_the_guidance(dit):
    counting = CountingDiT(dit)
    with torch.inference_mode():
        generate(counting, COND, _request(steps=2))  # cfg, stg and modality guidance: 4 passes a step
        assert len(counting.calls) == 8
        assert counting.calls[2] == ((1,), False) and counting.calls[3] == ((), True)
        counting.calls.clear()
        generate(counting, COND, _request(mode="distilled"))
        assert len(counting.calls) == 8 and all(c == ((), False) for c in counting.calls)


def test_start_image_tokens_stay_exactly_the_encoded_latent(dit):
    g = torch.Generator().manual_seed(9)
    image_latent = torch.randn(1, 128, 1, H // 32, W // 32, generator=g)
    with torch.inference_mode():
        video, _ = generate(dit, COND, _request(mode="distilled"), keyframes=[Keyframe(image_latent, 0, 1.0)])
        partial, _ = generate(dit, COND, _request(mode="distilled"), keyframes=[Keyframe(image_latent, 0, 0.5)])
    assert torch.equal(video[:, :, :1], image_latent)
    assert not torch.equal(partial[:, :, :1], image_latent)


def test_keyframe_outside_the_video_or_of_another_size_is_refused(dit):
    latent = torch.zeros(1, 128, 1, H // 32, W // 32)
    with pytest.raises(ValueError, match="outside the 2 latent frames"):
        generate(dit, COND, _request(mode="distilled"), keyframes=[Keyframe(latent, 2, 1.0)])
    with pytest.raises(ValueError, match="encode the image at the sampler's width and height"):
        generate(dit, COND, _request(mode="distilled"), keyframes=[Keyframe(torch.zeros(1, 128, 1, 1, 1), 0, 1.0)])


def test_stage_2_renoises_both_modalities_from_the_given_latents(dit):
    with torch.inference_mode():
        video, audio = generate(dit, COND, _request(mode="distilled"))
        counting = CountingDiT(dit)
        refined, refined_audio = generate(counting, COND, _request(mode="stage 2", seed=5), video_latent=video,
                                          audio_latent=audio)
    assert len(counting.calls) == 3  # 0.909375 → 0.725 → 0.421875 → 0
    assert refined.shape == video.shape and refined_audio.shape == audio.shape
    assert not torch.equal(refined, video)


def test_stage_2_input_errors(dit):
    with pytest.raises(ValueError, match="connect the upsampled video latent"):
        generate(dit, COND, _request(mode="stage 2"))
    with pytest.raises(ValueError, match="twice the first stage"):
        generate(dit, COND, _request(mode="stage 2"), video_latent=torch.zeros(1, 128, 2, 1, 2),
                 audio_latent=torch.zeros(1, 8, 9, 16))
    video = torch.zeros(1, 128, 2, 2, 4)
    with pytest.raises(ValueError, match="connect its audio_latent, or turn 'audio' off"):
        generate(dit, COND, _request(mode="stage 2"), video_latent=video)
    for wrong in (video, torch.zeros(1, 4, 8, 8)):  # a video latent, an image latent
        with pytest.raises(ValueError, match=r"not an LTX-2 audio latent \[1, 8, steps, 16\]: connect the first"):
            generate(dit, COND, _request(mode="stage 2"), video_latent=video, audio_latent=wrong)
    with pytest.raises(ValueError, match="the first stage made no sound"):
        generate(dit, COND, _request(mode="stage 2"), video_latent=video, audio_latent=torch.zeros(1, 8, 0, 16))
    with pytest.raises(ValueError, match="inputs of mode 'stage 2'"):
        generate(dit, COND, _request(mode="dev"), video_latent=torch.zeros(1, 128, 2, 2, 4))


@pytest.mark.parametrize("kw, words", [
    ({"frames": 12}, ["8k+1", "9", "17"]),
    ({"width": 100}, ["multiple of 32", "96", "128"]),
    ({"mode": "stage 2", "width": 160}, ["multiple of 64", "128", "192"]),
    ({"mode": "turbo"}, ["dev, distilled, stage 2"]),
    ({"steps": 1}, ["at least 2"]),
])
def test_bad_requests_name_the_valid_values(dit, kw, words):
    with pytest.raises(ValueError) as err:
        generate(dit, COND, _request(**kw))
    for word in words:
        assert word in str(err.value)
    if "width" in kw or "frames" in kw:
        assert isinstance(err.value, SizeError)


def test_video_only_and_guidance_without_negative(dit):
    with torch.inference_mode():
        video, audio = generate(dit, COND, _request(mode="distilled", audio=False))
    assert audio is None and video.shape[1] == 128
    with pytest.raises(ValueError, match="negative prompt"):
        generate(dit, LTX2Conditioning(COND.positive, None), _request())


def test_token_count_shift_changes_the_schedule():
    official = _request(steps=8).sigmas(tokens=16)
    by_tokens = _request(steps=8, token_count_shift=True).sigmas(tokens=16)
    assert official[0] == by_tokens[0] == 1 and official[-1] == by_tokens[-1] == 0
    assert (by_tokens[1:-2] < official[1:-2]).all()  # fewer tokens than 4096 → a smaller shift


def test_patchified_keyframe_order_matches_the_token_layout():
    latent = torch.arange(128 * 2 * 2 * 4, dtype=torch.float32).view(1, 128, 2, 2, 4)
    tokens = patchify_video(latent)
    assert torch.equal(tokens[0, 0], latent[0, :, 0, 0, 0]) and torch.equal(tokens[0, 8], latent[0, :, 1, 0, 0])


def test_decode_audio_without_latent_is_an_empty_track():
    from cinetune.ltx2.loader import LTX2VAEs

    out = pipeline.decode_audio(LTX2VAEs(video=None), None)
    assert out["waveform"].shape == (1, 2, 0) and out["sample_rate"] == 24000


def test_stg_block_must_exist_in_the_model(dit):
    with pytest.raises(ValueError, match="this model has 2 blocks"):
        generate(dit, COND, _request(stg_block=29))


def test_on_step_reports_the_clean_video_estimate_of_every_step(dit):
    g = torch.Generator().manual_seed(9)
    image_latent = torch.randn(1, 128, 1, H // 32, W // 32, generator=g)
    seen = []
    with torch.inference_mode():
        video, _ = generate(dit, COND, _request(mode="distilled"), keyframes=[Keyframe(image_latent, 0, 1.0)],
                            on_step=lambda i, n, latent: seen.append((i, n, latent.clone())))
    steps = len(pipeline.sampling.DISTILLED_SIGMAS) - 1
    assert [(i, n) for i, n, _ in seen] == [(i, steps) for i in range(1, steps + 1)]
    for _, _, latent in seen:
        assert latent.shape == video.shape and latent.dtype == torch.float32
        assert torch.equal(latent[:, :, :1], image_latent)  # conditioned frame: its clean latent
    assert torch.equal(seen[-1][2], video)  # the last sigma is 0: the last estimate is the result
    assert not torch.equal(seen[0][2], video)
