"""Video and audio I/O with PyAV: round trips, the real Big Buck Bunny clip (5.1 AAC), broken files, atomic writes,
resampling and channel mixing against torchaudio and the ITU formulas."""

from __future__ import annotations

import math

import av
import numpy as np
import pytest
import torch
import torchaudio  # test-only reference (scripts/setup_env.sh installs it); the pack never imports it

from cinetune.core import media, media_write
from cinetune.core.media import (MediaError, mix_channels, probe_audio, probe_video, read_audio, read_video, resample,
                                 write_video)


def smooth_video(frames: int, height: int, width: int) -> torch.Tensor:
    """Moving colour gradients, float 0..1, [F, H, W, 3]."""
    t = torch.arange(frames, dtype=torch.float32).view(-1, 1, 1)
    y = torch.arange(height, dtype=torch.float32).view(1, -1, 1)
    x = torch.arange(width, dtype=torch.float32).view(1, 1, -1)
    r = 0.5 + 0.4 * torch.sin(x / 15 + y / 40 + t / 3)
    g = 0.5 + 0.4 * torch.cos(y / 12 - t / 4) + 0 * x
    b = (x + y) / (height + width) + 0.05 * torch.sin(t) + 0 * (x + y)
    return torch.stack([r.expand(frames, height, width), g.expand(frames, height, width),
                        b.expand(frames, height, width)], dim=-1).clamp(0, 1)


def test_round_trip_smooth_video(tmp_path):
    video = smooth_video(12, 48, 80)
    path = write_video(video, tmp_path / "clip.mp4", fps=24.0)
    assert path == tmp_path / "clip.mp4"
    frames, fps = read_video(path)
    assert frames.shape == (12, 48, 80, 3) and frames.dtype == torch.uint8
    assert fps == 24.0
    err = (frames.float() / 255 - video).abs().mean().item()
    assert err < 8 / 255
    assert probe_video(path) == {"frames": 12, "width": 80, "height": 48, "fps": 24.0, "codec": "h264"}


def test_round_trip_uint8_saturated_colours(tmp_path):
    video = torch.zeros(3, 32, 32, 3, dtype=torch.uint8)
    for i in range(3):
        video[i, ..., i] = 255
    frames, fps = read_video(write_video(video, tmp_path / "rgb.mp4", fps=25))
    assert fps == 25.0
    # the colour matrix used to decode matches the one used to encode: primaries come back pure
    centre = frames[:, 16, 16].int()
    assert (centre - video[:, 16, 16].int()).abs().max() <= 6


def test_ntsc_frame_rate(tmp_path):
    _, fps = read_video(write_video(smooth_video(4, 16, 16), tmp_path / "ntsc.mp4", fps=30000 / 1001))
    assert fps == pytest.approx(29.97002997, abs=1e-6)


def test_odd_size_is_padded_to_even(tmp_path):
    video = smooth_video(3, 33, 47)
    path = write_video(video, tmp_path / "odd.mp4")
    meta = probe_video(path)
    assert (meta["width"], meta["height"]) == (48, 34)
    frames, _ = read_video(path)
    assert (frames[:, :33, :47].float() / 255 - video).abs().mean() < 8 / 255
    # the padding repeats the last row/column
    assert (frames[:, 33].float() - frames[:, 32].float()).abs().mean() < 6


def test_max_frames(tmp_path):
    path = write_video(smooth_video(10, 16, 16), tmp_path / "ten.mp4")
    frames, _ = read_video(path, max_frames=4)
    assert frames.shape[0] == 4
    with pytest.raises(MediaError, match="max_frames"):
        read_video(path, max_frames=0)


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    path = write_video(smooth_video(2, 16, 16), tmp_path / "out.mp4")
    original = path.read_bytes()
    calls = []

    def failing(array):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash while encoding")
        return array.copy()

    monkeypatch.setattr(media_write.np, "ascontiguousarray", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_video(smooth_video(6, 32, 32), path)
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    write_video(smooth_video(5, 32, 32), path)
    assert probe_video(path)["frames"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


@pytest.mark.parametrize(
    "frames, kwargs, message",
    [
        (torch.zeros(2, 16, 16, 4), {}, r"\[F, H, W, 3\]"),
        (torch.zeros(0, 16, 16, 3), {}, "no frames"),
        (torch.zeros(2, 16, 16, 3, dtype=torch.int32), {}, "uint8"),
        (torch.zeros(2, 16, 16, 3), {"fps": 0}, "fps"),
        (torch.zeros(2, 16, 16, 3), {"crf": 60}, "crf"),
    ],
)
def test_write_rejects_bad_input(tmp_path, frames, kwargs, message):
    with pytest.raises(MediaError, match=message):
        write_video(frames, tmp_path / "bad.mp4", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_write_requires_mp4_extension(tmp_path):
    with pytest.raises(MediaError, match=r"\.mp4"):
        write_video(torch.zeros(1, 16, 16, 3), tmp_path / "clip.webm")


def test_big_buck_bunny_probe_and_read(test_data):
    path = test_data["bbb"]
    assert probe_video(path) == {"frames": 132, "width": 1280, "height": 720, "fps": 25.0, "codec": "h264"}
    frames, fps = read_video(path, max_frames=6)
    assert frames.shape == (6, 720, 1280, 3) and fps == 25.0
    assert frames.float().std() > 10  # real picture content, not a blank decode


def test_probe_counts_frames_when_container_has_no_count(test_data, tmp_path):
    mkv = tmp_path / "bbb.mkv"
    with av.open(str(test_data["bbb"])) as src, av.open(str(mkv), "w", format="matroska") as dst:
        in_stream = src.streams.video[0]
        out_stream = dst.add_stream_from_template(in_stream)
        for packet in src.demux(in_stream):
            if packet.dts is None:
                continue
            packet.stream = out_stream
            dst.mux(packet)
    with av.open(str(mkv)) as check:
        assert check.streams.video[0].frames == 0  # Matroska stores no frame count
    assert probe_video(mkv)["frames"] == 132


def test_truncated_big_buck_bunny_is_a_clear_error(test_data, tmp_path):
    broken = tmp_path / "bbb_first_10k.mp4"
    broken.write_bytes(test_data["bbb"].read_bytes()[:10_000])
    with pytest.raises(MediaError) as info:
        read_video(broken)
    assert str(broken) in str(info.value) and "truncated" in str(info.value)
    with pytest.raises(MediaError, match="bbb_first_10k.mp4"):
        probe_video(broken)


def test_truncated_file_with_index_at_front_is_detected(tmp_path):
    # faststart puts the index first, so a cut file still opens: the missing frames must be noticed
    path = write_video(smooth_video(24, 64, 64), tmp_path / "full.mp4")
    cut = tmp_path / "cut.mp4"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(MediaError, match="cut.mp4.*truncated"):
        read_video(cut)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.mp4"):
        read_video(tmp_path / "nothing.mp4")
    with pytest.raises(FileNotFoundError, match="nothing.mp4"):
        probe_video(tmp_path / "nothing.mp4")


def test_not_a_video(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("definitely not a video\n" * 50)
    with pytest.raises(MediaError, match="notes.mp4"):
        read_video(text)



def test_decode_frames_selects_frames_and_stops_early(test_data):
    frames, _ = read_video(test_data["bbb"], max_frames=12)
    picked = media.decode_frames(test_data["bbb"], [11, 0, 5, 5])
    assert sorted(picked) == [0, 5, 11]
    for i in (0, 5, 11):
        assert torch.equal(picked[i], frames[i])
    halves = media.decode_frames(test_data["bbb"], [2], transform=lambda f: f[::2, ::2])
    assert halves[2].shape == (360, 640, 3)
    with pytest.raises(MediaError, match="frame 500 is needed"):
        media.decode_frames(test_data["bbb"], [500])
    assert media.count_decodable_frames(test_data["bbb"]) == 132


# ---------------------------------------------------------------------------------------------------------- audio

SQRT_HALF = 0.5 ** 0.5


def raw_audio(path) -> tuple[torch.Tensor, int, list[str]]:
    """Every sample of the first audio stream as float32 [C, S], straight from PyAV (fltp), with rate and names."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        chunks = [frame.to_ndarray() for frame in container.decode(stream)]
        names = [c.name for c in stream.layout.channels]
        rate = stream.codec_context.sample_rate
    assert chunks[0].dtype == np.float32 and chunks[0].shape[0] == len(names)  # planar float
    return torch.from_numpy(np.concatenate(chunks, axis=1)), rate, names


def write_wav(path, waveform: torch.Tensor, rate: int, codec: str = "pcm_f32le") -> None:
    """A WAV file with the given [C, S] float waveform."""
    layout = {1: "mono", 2: "stereo", 6: "5.1"}[waveform.shape[0]]
    fmt = {"pcm_f32le": "flt", "pcm_s16le": "s16"}[codec]
    data = waveform.numpy().T.reshape(1, -1)  # packed: interleaved channels
    if fmt == "s16":
        data = np.round(data * 32767).astype(np.int16)
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def tone(seconds: float, rate: int, freqs=(440.0, 660.0), amplitude=0.4) -> torch.Tensor:
    t = torch.arange(round(seconds * rate), dtype=torch.float64) / rate
    return torch.stack([amplitude * torch.sin(2 * math.pi * f * t) for f in freqs]).float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("rates", [(48000, 16000), (44100, 16000), (22050, 16000), (16000, 24000), (8000, 44100)])
def test_resample_matches_torchaudio(rates):
    src, dst = rates
    x = torch.randn(2, 3, 7001, generator=torch.Generator().manual_seed(0))
    y = resample(x, src, dst)
    assert y.shape == (2, 3, math.ceil(7001 * dst / src)) and y.dtype == torch.float32
    assert rel_err(y, torchaudio.functional.resample(x, src, dst)) < 1e-5
    assert rel_err(resample(x.double(), src, dst), torchaudio.functional.resample(x.double(), src, dst)) < 1e-12


def test_resample_keeps_a_tone_and_rejects_bad_rates():
    x = tone(0.5, 44100, freqs=(1000.0,))
    y = resample(x, 44100, 16000)
    expected = tone(0.5, 16000, freqs=(1000.0,))
    assert rel_err(y[:, 200:-200], expected[:, 200:-200]) < 1e-3  # band-limited interpolation of a 1 kHz sine
    assert resample(x, 16000, 16000) is x
    for bad in (0, -16000, 16000.5, True):
        with pytest.raises(MediaError, match="positive integer"):
            resample(x, bad, 16000)
    with pytest.raises(MediaError, match="floating point"):
        resample(torch.zeros(1, 100, dtype=torch.int16), 8000, 16000)


def test_mix_channels_itu_downmix_and_mono():
    g = SQRT_HALF
    x = torch.randn(2, 6, 50, generator=torch.Generator().manual_seed(1))  # FL FR FC LFE BL BR
    stereo = mix_channels(x, 2)
    left = (x[:, 0] + g * x[:, 2] + g * x[:, 4]) / (1 + 2 * g)
    right = (x[:, 1] + g * x[:, 2] + g * x[:, 5]) / (1 + 2 * g)
    assert torch.allclose(stereo, torch.stack([left, right], dim=1), atol=1e-6)
    side = mix_channels(x[0], 2, names=["FL", "FR", "FC", "LFE", "SL", "SR"])
    assert torch.allclose(side, stereo[0], atol=1e-6)
    assert torch.allclose(mix_channels(x, 1), stereo.mean(dim=1, keepdim=True), atol=1e-6)
    seven = torch.randn(8, 40)  # FL FR FC LFE BL BR SL SR
    mixed = mix_channels(seven, 2)
    assert torch.allclose(mixed[0], (seven[0] + g * (seven[2] + seven[4] + seven[6])) / (1 + 3 * g), atol=1e-6)
    three = torch.randn(3, 40)  # no default order for 3 channels: equal weights
    assert torch.allclose(mix_channels(three, 2), three.mean(0, keepdim=True).expand(2, 40), atol=1e-6)
    mono = torch.randn(1, 30)
    assert torch.equal(mix_channels(mono, 2), torch.cat([mono, mono]))
    assert torch.allclose(mix_channels(torch.stack([mono[0], -mono[0]]), 1), torch.zeros(1, 30))
    with pytest.raises(MediaError, match="no channels"):
        mix_channels(torch.zeros(0, 100), 2)
    with pytest.raises(MediaError, match="channels must be 1"):
        mix_channels(mono, 3)
    with pytest.raises(MediaError, match="5 channel names"):
        mix_channels(x[0], 2, names=["FL", "FR", "FC", "LFE", "BL"])


def test_read_audio_big_buck_bunny_51_to_stereo_16k(test_data):
    path = test_data["bbb"]
    assert probe_audio(path) == {"sample_rate": 48000, "channels": 6, "layout": "5.1", "codec": "aac",
                                 "duration": pytest.approx(5.312)}
    raw, rate, names = raw_audio(path)
    assert rate == 48000 and names == ["FL", "FR", "FC", "LFE", "BL", "BR"]
    g = SQRT_HALF
    left = (raw[0] + g * raw[2] + g * raw[4]) / (1 + 2 * g)
    right = (raw[1] + g * raw[2] + g * raw[5]) / (1 + 2 * g)
    expected = torchaudio.functional.resample(torch.stack([left, right]), 48000, 16000)

    audio = read_audio(path, sample_rate=16000)
    assert audio.shape == (2, math.ceil(raw.shape[1] / 3)) and audio.dtype == torch.float32
    assert rel_err(audio, expected) < 1e-5
    assert audio.std() > 1e-3 and audio.abs().max() <= 1.0  # real sound, in range

    clip = read_audio(path, sample_rate=16000, start=1.5, duration=2.0)
    assert clip.shape == (2, 32000)
    assert torch.allclose(clip, audio[:, 24000:56000], atol=1e-6)  # a span is the slice of the whole
    tail = read_audio(path, sample_rate=16000, start=5.0, duration=1.0)
    assert tail.shape == (2, 16000)
    assert torch.allclose(tail[:, :4992], audio[:, 80000:], atol=1e-6)
    assert tail[:, 4992:].abs().max() == 0  # padded with silence past the end
    mono = read_audio(path, sample_rate=8000, channels=1, duration=1.0)
    assert mono.shape == (1, 8000)
    with pytest.raises(MediaError, match="past the end"):
        read_audio(path, sample_rate=16000, start=6.0)


def test_read_audio_mono_file_is_duplicated_and_resampled(tmp_path):
    source = tone(0.75, 44100, freqs=(300.0,))
    write_wav(tmp_path / "mono.wav", source, 44100)
    # a plain WAVE header stores no channel positions: FFmpeg reports "1 channels"
    assert probe_audio(tmp_path / "mono.wav") == {"sample_rate": 44100, "channels": 1, "layout": "1 channels",
                                                  "codec": "pcm_f32le", "duration": pytest.approx(0.75)}
    audio = read_audio(tmp_path / "mono.wav", sample_rate=16000)
    assert audio.shape == (2, 12000)
    assert torch.equal(audio[0], audio[1])
    assert rel_err(audio[0], torchaudio.functional.resample(source[0], 44100, 16000)) < 1e-5
    assert torch.equal(read_audio(tmp_path / "mono.wav", sample_rate=44100, channels=1), source)


def test_read_audio_six_channel_wav_is_downmixed(tmp_path):
    source = torch.rand(6, 4000, generator=torch.Generator().manual_seed(3)) - 0.5
    write_wav(tmp_path / "six.wav", source, 16000)
    audio = read_audio(tmp_path / "six.wav", sample_rate=16000)
    g = SQRT_HALF
    left = (source[0] + g * source[2] + g * source[4]) / (1 + 2 * g)
    right = (source[1] + g * source[2] + g * source[5]) / (1 + 2 * g)
    assert torch.allclose(audio, torch.stack([left, right]), atol=1e-6)


def test_read_audio_converts_integer_samples(tmp_path):
    source = tone(0.2, 16000)
    write_wav(tmp_path / "s16.wav", source, 16000, codec="pcm_s16le")
    audio = read_audio(tmp_path / "s16.wav", sample_rate=16000)
    assert (audio - source).abs().max() < 2 / 32767


def test_no_audio_stream_is_an_error_or_none(tmp_path):
    path = write_video(smooth_video(3, 16, 16), tmp_path / "silent.mp4")
    assert probe_audio(path) is None
    with pytest.raises(MediaError, match="silent.mp4.*no audio stream"):
        read_audio(path, sample_rate=16000)
    assert read_audio(path, sample_rate=16000, allow_missing=True) is None


@pytest.mark.parametrize("kwargs, message", [
    ({"sample_rate": 0}, "sample_rate"), ({"sample_rate": 16000, "channels": 6}, "channels"),
    ({"sample_rate": 16000, "start": -1.0}, "start"), ({"sample_rate": 16000, "duration": 0}, "duration"),
])
def test_read_audio_rejects_bad_arguments(tmp_path, kwargs, message):
    write_wav(tmp_path / "a.wav", tone(0.1, 8000), 8000)
    with pytest.raises(MediaError, match=message):
        read_audio(tmp_path / "a.wav", **kwargs)


def test_write_video_with_audio_muxes_one_aac_track(tmp_path):
    frames, fps, rate = 25, 24.0, 24000
    sound = tone(2.0, rate)  # longer than the video: trimmed
    path = write_video(smooth_video(frames, 32, 48), tmp_path / "av.mp4", fps=fps, audio=sound,
                       audio_sample_rate=rate)
    with av.open(str(path)) as container:
        assert [s.type for s in container.streams] == ["video", "audio"]
        assert container.streams.audio[0].codec_context.name == "aac"
    assert probe_video(path)["frames"] == frames
    assert read_video(path)[0].shape[0] == frames
    meta = probe_audio(path)
    assert (meta["sample_rate"], meta["channels"], meta["layout"]) == (rate, 2, "stereo")
    video_seconds = frames / fps
    assert abs(meta["duration"] - video_seconds) <= 1024 / rate
    decoded = read_audio(path, sample_rate=rate)
    assert abs(decoded.shape[1] - round(video_seconds * rate)) <= 1024  # AAC rounds the last packet up
    span = slice(2048, 20000)
    assert rel_err(decoded[:, span], sound[:, span]) < 0.01  # aligned (priming removed) and faithful


@pytest.mark.parametrize("channels, rate, stored_channels, stored_rate", [
    (1, 16000, 1, 16000), (6, 48000, 2, 48000), (2, 44100, 2, 44100), (2, 22000, 2, 48000)])
def test_write_video_audio_layouts_rates_and_padding(tmp_path, channels, rate, stored_channels, stored_rate):
    sound = torch.rand(channels, rate // 4, generator=torch.Generator().manual_seed(2)) - 0.5  # 0.25 s: padded
    path = write_video(smooth_video(12, 16, 16), tmp_path / "x.mp4", fps=12.0, audio=sound, audio_sample_rate=rate)
    meta = probe_audio(path)
    assert (meta["channels"], meta["sample_rate"]) == (stored_channels, stored_rate)
    assert abs(meta["duration"] - 1.0) <= 1024 / stored_rate
    decoded = read_audio(path, sample_rate=stored_rate, channels=stored_channels)
    assert decoded[:, stored_rate // 2: stored_rate - 1024].abs().max() < 1e-3  # silence after the sound


def test_write_video_with_audio_is_atomic(tmp_path, monkeypatch):
    path = write_video(smooth_video(2, 16, 16), tmp_path / "out.mp4")
    original = path.read_bytes()
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated crash while muxing audio")
        return real(*args, **kwargs)

    real = av.AudioFrame.from_ndarray
    monkeypatch.setattr(media_write.av.AudioFrame, "from_ndarray", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_video(smooth_video(8, 16, 16), path, fps=8.0, audio=tone(1.0, 16000), audio_sample_rate=16000)
    monkeypatch.undo()
    assert len(calls) == 4
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    with pytest.raises(RuntimeError, match="simulated crash"), monkeypatch.context() as patch:
        calls.clear()
        patch.setattr(media_write.av.AudioFrame, "from_ndarray", failing)
        write_video(smooth_video(8, 16, 16), tmp_path / "new.mp4", fps=8.0, audio=tone(1.0, 16000),
                    audio_sample_rate=16000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


@pytest.mark.parametrize("kwargs, message", [
    ({"audio": torch.zeros(2, 100, dtype=torch.int16), "audio_sample_rate": 16000}, "float"),
    ({"audio": torch.zeros(2, 2, 100), "audio_sample_rate": 16000}, r"\[channels, samples\]"),
    ({"audio": torch.zeros(0, 100), "audio_sample_rate": 16000}, "no channels"),
    ({"audio": torch.zeros(2, 100)}, "audio_sample_rate"),
    ({"audio": torch.zeros(2, 100), "audio_sample_rate": 16000.5}, "audio_sample_rate"),
    ({"audio_sample_rate": 16000}, "without audio"),
])
def test_write_video_rejects_bad_audio(tmp_path, kwargs, message):
    with pytest.raises(MediaError, match=message):
        write_video(torch.zeros(2, 16, 16, 3), tmp_path / "bad.mp4", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_fit_image_covers_and_centre_crops():
    from cinetune.core.media import fit_image

    image = torch.zeros(1, 40, 100, 3)
    image[:, :, 40:60] = 1.0  # a white vertical band in the middle
    out = fit_image(image, 20, 40)  # a portrait target: scale 40/40, crop the centre 20 columns of 100
    assert out.shape == (1, 3, 1, 40, 20)
    assert torch.equal(out, torch.ones_like(out))
    with pytest.raises(ValueError, match="RGB"):
        fit_image(torch.zeros(1, 8, 8, 4), 8, 8)
    with pytest.raises(ValueError, match="positive"):
        fit_image(torch.zeros(8, 8, 3), 0, 8)


def test_h264_round_trip_adds_compression_artefacts_only():
    from cinetune.core.media import fit_image, h264_round_trip

    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 96), indexing="ij")
    smooth = torch.stack([x, y, (x * 6).sin() * 0.5 + 0.5], dim=-1)  # a smooth image, like a photo's large areas
    pixels = fit_image(smooth, 96, 64)
    light = h264_round_trip(pixels, 10)
    heavy = h264_round_trip(pixels, 45)
    assert light.shape == heavy.shape == pixels.shape
    error_light, error_heavy = (light - pixels).abs().mean(), (heavy - pixels).abs().mean()
    assert error_light < error_heavy  # stronger compression, larger error
    assert error_light < 0.03
    assert torch.equal(h264_round_trip(pixels, 0), pixels)
    with pytest.raises(MediaError, match="even"):
        h264_round_trip(torch.zeros(1, 3, 1, 33, 64), 33)
