"""Image-to-video training on single-frame samples (nodes.rules): the trainers' check of the cached samples
(``i2v_single_frames``: all single frames refused, some reported) and the cachers' queue-time rule
(``K5_I2V_CLIP`` / ``LTX2_I2V_CLIP``: frames 1 with image_to_video refused)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cinetune.k5.family import K5_LATENT_FORMAT
from cinetune.ltx2.family import LTX2_LATENT_FORMAT
from cinetune.nodes import rules
from cinetune.training.config import TrainConfig, TrainingError

K5_CONFIG = TrainConfig(i2v="first")


def clips(*frames: int) -> list:
    return [SimpleNamespace(frames=n) for n in frames]


def check(config: TrainConfig, samples: list, latent_format=K5_LATENT_FORMAT) -> str | None:
    return rules.i2v_single_frames(config, samples, latent_format, cacher="K5 Cache Latents",
                                   turn_off="set image_to_video to 'off'")


@pytest.mark.parametrize("latent_format, shortest, rule", [(K5_LATENT_FORMAT, 5, "4k+1"),
                                                           (LTX2_LATENT_FORMAT, 9, "8k+1")])
def test_image_to_video_on_single_frames_only_is_refused_with_the_family_clip_length(latent_format, shortest, rule):
    with pytest.raises(TrainingError) as err:
        check(K5_CONFIG, clips(1, 1, 1), latent_format)
    message = str(err.value)
    assert "every training clip is a single frame" in message
    assert f"cache clips of {shortest} frames or more ({rule}) in K5 Cache Latents" in message
    assert message.endswith("or set image_to_video to 'off'.")


@pytest.mark.parametrize("config", [TrainConfig(i2v="first_last"), TrainConfig(i2v="first", i2v_prob=0.5)])
def test_every_image_to_video_mode_counts_the_single_frames(config):
    with pytest.raises(TrainingError):
        check(config, clips(1))
    assert check(config, clips(17, 1, 5, 1, 1)) == "3 of 5 samples are single frames and train text-to-video only"


def test_clips_of_two_latent_frames_or_more_need_no_note():
    assert check(K5_CONFIG, clips(5, 17, 49)) is None
    assert check(K5_CONFIG, clips(9, 17), LTX2_LATENT_FORMAT) is None
    assert check(K5_CONFIG, clips(9, 1), LTX2_LATENT_FORMAT) == ("1 of 2 samples are single frames and train "
                                                                  "text-to-video only")


@pytest.mark.parametrize("config", [TrainConfig(), TrainConfig(i2v="first", i2v_prob=0.0)])
def test_text_to_video_training_takes_single_frames(config):
    assert check(config, clips(1, 1)) is None


@pytest.mark.parametrize("rule, shortest", [(rules.K5_I2V_CLIP, 5), (rules.LTX2_I2V_CLIP, 9)])
def test_cachers_refuse_single_frame_clips_for_image_to_video(rule, shortest):
    message = rules.rule_problem(rule, {"frames": 1, "image_to_video": True}, {})
    assert message == ("image_to_video conditions a clip on its first frame, so clips need more than one: set frames "
                       f"to {shortest} or more")
    assert rules.rule_problem(rule, {"frames": 1, "image_to_video": False}, {}) is None
    assert rules.rule_problem(rule, {"frames": shortest, "image_to_video": True}, {}) is None
    assert rules.rule_problem(rule, {"frames": None, "image_to_video": True}, {}) is None  # linked: checked later
    with pytest.raises(ValueError, match=f"set frames to {shortest} or more"):
        rule.check(frames=1, image_to_video=True)  # what the cacher runs before caching
