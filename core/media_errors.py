"""The error raised by the media modules (:mod:`cinetune.core.media`)."""


class MediaError(ValueError):
    """A media file or waveform cannot be read or written; the message names the file and the reason."""
