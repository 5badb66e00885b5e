"""Video geometry: how pixels, frames, latents and DiT tokens line up. Every size check and the VAE use this.

Mochi's VAE compresses 6x in time and 8x8 in space, causally: latent frame 0 encodes video frame 0 alone and each
later latent frame encodes 6 more frames, so T latent frames decode to 6T - 5 frames. The DiT patches 2x2 latent
pixels into one token, so a video's height and width are multiples of 16 pixels.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VideoGeometry:
    """The compression factors between a video and its latents; the defaults are Mochi's."""

    temporal: int = 6  # video frames per latent frame, after the first
    spatial: int = 8  # video pixels per latent pixel, along each axis
    patch: int = 2  # latent pixels per DiT token, along each axis
    channels: int = 12  # latent channels

    @property
    def pixel_multiple(self) -> int:
        """Height and width must be multiples of this (16 for Mochi)."""
        return self.spatial * self.patch

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames holding `num_frames` = temporal * k + 1 video frames."""
        return (num_frames - 1) // self.temporal + 1

    def num_frames(self, latent_frames: int) -> int:
        """Video frames decoded from `latent_frames` (6T - 5 for Mochi)."""
        return (latent_frames - 1) * self.temporal + 1

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T, H, W) of the latents of a valid video size."""
        return self.channels, self.latent_frames(num_frames), height // self.spatial, width // self.spatial

    def tokens(self, num_frames: int, height: int, width: int) -> int:
        """Visual tokens the DiT sees for a valid video size."""
        _, t, h, w = self.latent_shape(num_frames, height, width)
        return t * (h // self.patch) * (w // self.patch)

    def valid_frames(self, num_frames: int) -> bool:
        return num_frames >= 1 and (num_frames - 1) % self.temporal == 0

    def valid_size(self, pixels: int) -> bool:
        return pixels >= self.pixel_multiple and pixels % self.pixel_multiple == 0

    def nearest_frames(self, num_frames: int) -> list[int]:
        """The valid frame counts just below and above `num_frames` (e.g. 84 -> [79, 85])."""
        return _nearest(num_frames, self.temporal, offset=1, minimum=1)

    def nearest_size(self, pixels: int) -> list[int]:
        """The valid heights/widths just below and above `pixels` (e.g. 850 -> [848, 864])."""
        return _nearest(pixels, self.pixel_multiple, minimum=self.pixel_multiple)

    def problems(self, num_frames: int, height: int, width: int, names: dict[str, str] | None = None) -> list[str]:
        """What is wrong with a video size, each with the nearest valid values; [] when it is valid.

        `names` maps "num_frames", "height", "width" to what the caller's surface calls them (e.g. CLI flags).
        """
        names = names or {}
        problems = []
        if not self.valid_frames(num_frames):
            problems.append(
                f"{names.get('num_frames', 'num_frames')}={num_frames} is not of the form {self.temporal}k+1 "
                f"(nearest valid: {self.nearest_frames(num_frames)})"
            )
        for key, value in (("height", height), ("width", width)):
            if not self.valid_size(value):
                problems.append(
                    f"{names.get(key, key)}={value} is not a multiple of {self.pixel_multiple} of at least "
                    f"{self.pixel_multiple} (nearest valid: {self.nearest_size(value)})"
                )
        return problems

    def check(self, num_frames: int, height: int, width: int, names: dict[str, str] | None = None) -> None:
        """Raise ValueError naming every problem of a video size (see `problems`)."""
        if problems := self.problems(num_frames, height, width, names):
            raise ValueError("; ".join(problems))


def _nearest(value: int, multiple: int, offset: int = 0, minimum: int = 1) -> list[int]:
    """The values multiple * k + offset (at least `minimum`) just below and above `value`; `value` itself if valid."""
    below = (value - offset) // multiple * multiple + offset
    candidates = {below} if below == value else {below, below + multiple}
    return sorted(v for v in candidates if v >= minimum) or [minimum]


MOCHI = VideoGeometry()
