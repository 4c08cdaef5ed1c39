"""Video I/O with PyAV: round trips, the real Big Buck Bunny clip, broken files, atomic writes."""

from __future__ import annotations

import av
import pytest
import torch

from cinetune.core import media
from cinetune.core.media import MediaError, probe_video, read_video, write_video


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

    monkeypatch.setattr(media.np, "ascontiguousarray", failing)
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
