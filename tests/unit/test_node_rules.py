"""Queue-time rules of the nodes (nodes.rules) and plain error messages (nodes.errors), without ComfyUI: what each
rule refuses and with which fix, when a rule waits for a linked value, and how the pack's exceptions leave a node."""

from __future__ import annotations

import asyncio
import inspect
import traceback
from types import SimpleNamespace

import pytest

from cinetune.core.attention import BACKENDS, AttentionBackendError, available_backends
from cinetune.core.lora import LoRAError
from cinetune.k5.family import K5_LATENT_FORMAT
from cinetune.ltx2.family import LTX2_LATENT_FORMAT
from cinetune.nodes import errors, rules
from cinetune.training.config import TrainingError
from cinetune.training.data import DatasetLocationError


def problem(rule: rules.NodeRule, defaults: dict | None = None, **values) -> str | None:
    return rules.rule_problem(rule, values, defaults or {})


# ---------------------------------------------------------------------------------------------- per-input rules


@pytest.mark.parametrize("fmt, good, bad, nearest", [(K5_LATENT_FORMAT, (1, 5, 49, 121), 50, "use 49 or 53"),
                                                     (LTX2_LATENT_FORMAT, (1, 9, 49, 121), 50, "use 49 or 57")])
def test_frame_counts_follow_the_family_rule(fmt, good, bad, nearest):
    rule = rules.FrameCount(fmt)
    for n in good:
        rule(n)
    with pytest.raises(ValueError, match=nearest):
        rule(bad)
    with pytest.raises(ValueError):
        rule(0)


def test_attention_backend_names_are_checked_as_value_errors():
    rules.attention_backend("sdpa")
    with pytest.raises(ValueError, match="choose one of") as err:
        rules.attention_backend("fastest")
    assert not isinstance(err.value, AttentionBackendError) and "sdpa" in str(err.value)
    missing = [name for name in BACKENDS if name not in available_backends()]
    if missing:
        with pytest.raises(ValueError, match=missing[0]):
            rules.attention_backend(missing[0])


# ---------------------------------------------------------------------------------------------- node rules


def test_k5_sampling_size_names_every_problem_with_the_nearest_values():
    text = problem(rules.K5_VIDEO_SIZE, width=500, height=512, frames=50)
    assert "width 500" in text and "496 or 512" in text and "use 49 or 53" in text and "height" not in text
    assert problem(rules.K5_VIDEO_SIZE, width=768, height=512, frames=121) is None
    assert "height 520" in problem(rules.K5_START_IMAGE_SIZE, width=768, height=520)


def test_a_rule_waits_for_linked_values_and_uses_defaults_for_left_out_ones():
    assert problem(rules.K5_VIDEO_SIZE, width=None, height=500, frames=50) is None  # width arrives through a link
    defaults = {"width": 500, "height": 512, "frames": 121}
    assert "width 500" in problem(rules.K5_VIDEO_SIZE, defaults, height=512, frames=121)
    assert problem(rules.K5_VIDEO_SIZE, {}, height=512, frames=121) is None  # no value, no default: nothing to check


@pytest.mark.parametrize("settings, expected", [
    (dict(width=768, height=512, frames=121, fps=24.0, steps=40, mode="dev"), None),
    (dict(width=768, height=500, frames=121, fps=24.0, steps=40, mode="dev"), "height 500"),
    (dict(width=768, height=512, frames=120, fps=24.0, steps=40, mode="dev"), "use 113 or 121"),
    (dict(width=800, height=512, frames=121, fps=24.0, steps=40, mode="stage 2"), "multiple of 64"),
    (dict(width=768, height=512, frames=121, fps=24.0, steps=1, mode="dev"), "at least 2"),
    (dict(width=768, height=512, frames=121, fps=24.0, steps=1, mode="distilled"), None),
])
def test_ltx2_sampling_settings_of_each_mode(settings, expected):
    text = problem(rules.LTX2_SAMPLING, **settings)
    assert text is None if expected is None else expected in text


def test_ltx2_sampler_inputs_a_setting_needs():
    def links(mode="dev", audio=True, **connected):
        return problem(rules.LTX2_SAMPLER_LINKS, mode=mode, audio=audio, **connected)

    assert links() is None
    assert "connect LTX-2 VAE Loader to 'vae'" in links(start_image=None)
    assert links(start_image=None, vae=None) is None
    assert "'video_latent'" in links("stage 2", audio_latent=None)
    assert "audio_latent" in links("stage 2", video_latent=None)
    assert links("stage 2", audio=False, video_latent=None) is None
    assert links("stage 2", video_latent=None, audio_latent=None) is None
    assert "inputs of mode 'stage 2'" in links("distilled", video_latent=None)


def test_ltx2_image_to_video_training_needs_clips_of_several_frames():
    assert "frames to 9 or more" in problem(rules.LTX2_I2V_CLIP, frames=1, image_to_video=True)
    assert problem(rules.LTX2_I2V_CLIP, frames=1, image_to_video=False) is None
    assert problem(rules.LTX2_I2V_CLIP, frames=9, image_to_video=True) is None


def test_node_problems_name_the_node_and_the_inputs():
    schema = SimpleNamespace(display_name="LTX-2 Sampler", inputs=[
        SimpleNamespace(id=name, default=value) for name, value in
        dict(model=None, width=768, height=512, frames=121, fps=24.0, steps=40, mode="dev", audio=True).items()])
    node = SimpleNamespace(define_schema=lambda: schema)
    node_rules = (rules.LTX2_SAMPLING, rules.LTX2_SAMPLER_LINKS)
    assert rules.node_rules_problem(node, {"model": None, "width": 768}, node_rules) is None
    text = rules.node_rules_problem(node, {"model": None, "height": 500}, node_rules)
    assert text.startswith("LTX-2 Sampler, inputs 'width', 'height', 'frames', 'fps', 'steps', 'mode': ")
    assert "height 500" in text
    text = rules.node_rules_problem(node, {"mode": "stage 2", "width": 512}, node_rules)
    assert text.startswith("LTX-2 Sampler, inputs 'mode', 'audio', 'vae', 'start_image', 'video_latent', ")
    one = rules.NodeRule(("frames",), lambda frames: K5_LATENT_FORMAT.latent_frames(frames))
    assert rules.node_rules_problem(node, {"frames": 10}, (one,)).startswith("LTX-2 Sampler, input 'frames': ")


# ---------------------------------------------------------------------------------------------- plain errors


def test_pack_errors_become_their_builtin_base_with_the_same_message():
    cases = [(TrainingError("lr must be > 0"), ValueError), (LoRAError("bad key"), ValueError),
             (AttentionBackendError("not installed"), RuntimeError),
             (DatasetLocationError("outside the roots"), ValueError)]
    for exc, builtin in cases:
        plain = errors.plain_exception(exc)
        assert type(plain) is builtin and str(plain) == str(exc)
        assert errors.is_pack_error(exc)
    lookup = type("MissingThing", (KeyError,), {"__module__": f"{errors.PACKAGE}.somewhere"})("no such entry")
    plain = errors.plain_exception(lookup)
    assert type(plain) is LookupError and str(plain) == "no such entry"


def test_host_and_builtin_exceptions_are_left_alone():
    interrupt = type("InterruptProcessingException", (Exception,), {"__module__": "comfy.model_management"})()
    for exc in (ValueError("plain"), interrupt, KeyboardInterrupt(), OSError(2, "gone"), SystemExit(1)):
        assert errors.plain_exception(exc) is None and not (isinstance(exc, Exception) and errors.is_pack_error(exc))


def raises_training_error(cls=None, **inputs):
    raise TrainingError(f"max_steps must be at least 1, got {inputs.get('max_steps')}")


def test_a_wrapped_function_raises_the_plain_error_chained_to_the_original():
    wrapped = errors.plain_errors(raises_training_error)
    assert errors.plain_errors(wrapped) is wrapped and wrapped.__name__ == "raises_training_error"
    with pytest.raises(ValueError) as err:
        wrapped(max_steps=0)
    assert type(err.value) is ValueError and str(err.value) == "max_steps must be at least 1, got 0"
    assert isinstance(err.value.__cause__, TrainingError)
    assert any("raises_training_error" in line for line in traceback.format_tb(err.value.__traceback__))
    stop = KeyboardInterrupt()

    def interrupted():
        raise stop

    with pytest.raises(KeyboardInterrupt) as err:
        errors.plain_errors(interrupted)()
    assert err.value is stop


def test_notes_travel_and_async_functions_stay_async():
    async def fails():
        exc = LoRAError("the LoRA is for another model")
        exc.add_note("file: style.safetensors")
        raise exc

    wrapped = errors.plain_errors(fails)
    assert inspect.iscoroutinefunction(wrapped)
    with pytest.raises(ValueError) as err:
        asyncio.run(wrapped())
    assert type(err.value) is ValueError and err.value.__notes__ == ["file: style.safetensors"]


def _host_copies(cls: type) -> type:
    """The class copies the host builds for each run: a shallow copy (the class and its bases as bases, its
    attributes copied), then a copy of that whose class attributes cannot be set."""
    clone = type(f"{cls.__name__}Clone", (cls, *cls.__bases__), dict(cls.__dict__))

    class Locked(type(clone)):
        def __setattr__(cls_, name, value):
            raise AttributeError(f"cannot set {name} on a locked class")

    return Locked(clone.__name__, clone.__bases__, dict(clone.__dict__))


def test_the_mixin_wraps_each_node_once_also_in_the_hosts_class_copies():
    class Base(errors.PlainErrors):
        pass

    class Node(Base):
        @classmethod
        def execute(cls, **inputs):
            return raises_training_error(cls, **inputs)

    class AsyncNode(Base):
        @classmethod
        async def execute(cls):
            raise AttentionBackendError("flash-attn is not installed")

    class Child(Node):
        pass

    assert "execute" not in Child.__dict__
    for node in (Node, Child, _host_copies(Node)):
        with pytest.raises(ValueError) as err:
            node.execute(max_steps=0)
        assert type(err.value) is ValueError and isinstance(err.value.__cause__, TrainingError)
    assert inspect.iscoroutinefunction(AsyncNode.execute)
    with pytest.raises(RuntimeError) as err:
        asyncio.run(_host_copies(AsyncNode).execute())
    assert type(err.value) is RuntimeError
