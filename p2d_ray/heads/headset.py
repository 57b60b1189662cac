"""``HeadSet``: the task heads, as (layer, head) pairs, validated against a model's geometry."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from p2d_ray.models.geometry import AttentionGeometry


@dataclass(frozen=True)
class HeadSet:
    heads: tuple[tuple[int, int], ...]  # sorted (layer, head) pairs of query heads
    geometry: AttentionGeometry
    # Provenance written to heads.json: method, scores [L, H], model fingerprint, probe hash, ...
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        heads = tuple(sorted({(int(layer), int(head)) for layer, head in self.heads}))
        bad = [
            (layer, head)
            for layer, head in heads
            if not (0 <= layer < self.geometry.n_layers and 0 <= head < self.geometry.n_heads)
        ]
        if bad:
            raise ValueError(
                f"heads {bad} do not fit the model ({self.geometry.n_layers} layers x "
                f"{self.geometry.n_heads} heads, family {self.geometry.family})"
            )
        object.__setattr__(self, "heads", heads)

    def __len__(self) -> int:
        return len(self.heads)

    def __iter__(self):
        return iter(self.heads)

    def mask(self) -> torch.Tensor:
        """``[L, H]`` float mask, 1.0 at task heads."""
        m = torch.zeros(self.geometry.n_layers, self.geometry.n_heads)
        for layer, head in self.heads:
            m[layer, head] = 1.0
        return m

    def gates_off(self) -> torch.Tensor:
        """``[L, H]`` gates with the task heads switched off (0) and every other head on (1)."""
        return 1.0 - self.mask()

    def by_layer(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for layer, head in self.heads:
            out.setdefault(layer, []).append(head)
        return out

    def kv_groups(self) -> set[tuple[int, int]]:
        """(layer, kv group) pairs touched by the task heads; a group shared by several heads counts once."""
        return {(layer, self.geometry.kv_group(head)) for layer, head in self.heads}

    def random_like(self, seed: int) -> HeadSet:
        """The falsification control: random heads with the same count *per layer* (same layer spread),
        avoiding the task heads where the layer has enough others."""
        gen = torch.Generator().manual_seed(seed)
        picked = []
        for layer, heads in sorted(self.by_layer().items()):
            others = [h for h in range(self.geometry.n_heads) if h not in heads]
            pool = others if len(others) >= len(heads) else list(range(self.geometry.n_heads))
            order = torch.randperm(len(pool), generator=gen).tolist()
            picked += [(layer, pool[i]) for i in order[: len(heads)]]
        return HeadSet(
            tuple(picked),
            self.geometry,
            {"method": "random", "seed": seed, "control_for": self.fingerprint()},
        )

    def fingerprint(self) -> str:
        payload = json.dumps({"heads": self.heads, "geometry": self.geometry.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def check_fits(self, geometry: AttentionGeometry) -> None:
        """Raise ValueError if these heads were found on a model of another shape."""
        if geometry.to_dict() != self.geometry.to_dict():
            raise ValueError(
                f"heads were localised on a model with geometry {self.geometry.to_dict()}, "
                f"but this model has {geometry.to_dict()}"
            )

    def check_model(self, fingerprint: str, name: str = "this model") -> None:
        """Raise ValueError if heads.json records another model's weights fingerprint (same shape or not).

        Refused rather than warned: heads localised on other weights are not this model's task heads, so
        scores and deltas built on them are silently meaningless, while re-localising costs minutes.
        A heads.json without a recorded fingerprint (hand-written, the random-heads control) is accepted.
        """
        recorded = self.meta.get("model_fingerprint")
        if recorded is not None and recorded != fingerprint:
            raise ValueError(
                f"heads were localised on a model with fingerprint {recorded}, but {name} has fingerprint "
                f"{fingerprint} (same geometry, other weights); rerun `p2d-ray localize` for this model"
            )

    # -- heads.json -------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "heads": [list(h) for h in self.heads],
            "geometry": self.geometry.to_dict(),
            "fingerprint": self.fingerprint(),
            **self.meta,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def from_json(cls, data: dict) -> HeadSet:
        try:
            geometry = AttentionGeometry(**data["geometry"])
            heads = [tuple(h) for h in data["heads"]]
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a heads.json document (missing or bad {err})") from None
        meta = {k: v for k, v in data.items() if k not in ("heads", "geometry", "fingerprint")}
        return cls(tuple(heads), geometry, meta)

    @classmethod
    def load(cls, path: str | Path) -> HeadSet:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"heads file not found: {path} (run `p2d-ray localize` first)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}); rerun `p2d-ray localize`") from None
        try:
            return cls.from_json(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
