"""``--data``: a named dataset (fashion-mnist, mnist, cifar10) or the user's own inputs, a tensor
file (``.pt``/``.pth``, ``.npy``/``.npz``, ``.safetensors``) or a folder of images, read by
:mod:`otfuse.inputs`.

A named dataset has splits: fusion and alignment use its train split, evaluation its test split
(``--split`` chooses). Own inputs are one set: fusion uses them (their labels are not used), and
evaluation needs labels (in the file, the folder's class sub-folders, or ``--labels FILE``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from otfuse.cli.common import ArgumentParser, UsageError, parse_kwargs
from otfuse.data import Dataset, dataset_info, dataset_names, is_dataset_name, load_dataset
from otfuse.errors import DataError
from otfuse.inputs import TENSOR_SUFFIXES, UserData, load_inputs

OWN = "a .pt/.pth, .npy/.npz or .safetensors file, or a folder of PNG/JPEG images"


def add_data(p: ArgumentParser, *, required: bool, split: str | None, own: bool = True) -> None:
    names = ", ".join(dataset_names())
    help = f"{names}" + (f", or {OWN}" if own else "")
    p.add_argument("--data", required=required, default=None, metavar="DATA", help=help)
    p.add_argument("--data-dir", default=None, help="folder holding a named dataset's files")
    if split is not None:
        p.add_argument(
            "--split",
            choices=("train", "test"),
            default=None,
            help=f"split of a named dataset to use (default {split})",
        )
    if own:
        p.add_argument(
            "--labels",
            default=None,
            metavar="FILE",
            help="own inputs: a tensor file of their labels (N,) (default: the labels in DATA)",
        )
        p.add_argument(
            "--normalize",
            default=None,
            metavar="SPEC",
            help="own inputs: normalise per channel after scaling pixels to [0, 1], with a named "
            "dataset's statistics (fashion-mnist) or mean=M,std=S (M, S: a number or (m1,m2,m3)); "
            "default: none",
        )


@dataclass
class DataSource:
    """What ``--data`` names, loaded on demand (each split once)."""

    text: str
    data_dir: str | None = None
    split: str | None = None
    labels: str | None = None
    normalize: str | None = None
    split_role: str = "eval"  # what --split chooses: the split to "fuse" with or to "eval" on
    _own: UserData | None = field(default=None, repr=False)
    _named: dict[str, Dataset] = field(default_factory=dict, repr=False)

    @classmethod
    def from_args(cls, args: Any, split_role: str = "eval") -> DataSource | None:
        if getattr(args, "data", None) is None:
            for option in ("labels", "normalize"):
                if getattr(args, option, None) is not None:
                    raise UsageError(f"--{option} applies to --data; pass --data too")
            return None
        source = cls(
            args.data,
            getattr(args, "data_dir", None),
            getattr(args, "split", None),
            getattr(args, "labels", None),
            getattr(args, "normalize", None),
            split_role,
        )
        source._check_usage()
        return source

    @property
    def is_named(self) -> bool:
        return is_dataset_name(self.text) and not Path(self.text).exists()

    def _check_usage(self) -> None:
        if self.is_named:
            for option in ("labels", "normalize"):
                if getattr(self, option) is not None:
                    raise UsageError(
                        f"--{option} applies to own inputs; {self.text} has its labels and "
                        "normalisation"
                    )
            return
        if self.split is not None:
            raise UsageError(f"--split applies to the named datasets, not to {self.text}")
        path = Path(self.text)
        if (
            not path.exists()
            and path.suffix.lower() not in TENSOR_SUFFIXES
            and "/" not in self.text
        ):
            raise DataError(
                f"unknown dataset '{self.text}': choose one of {', '.join(dataset_names())}, "
                f"or give {OWN}"
            )

    # -- loading -----------------------------------------------------------------------------
    def own(self) -> UserData:
        if self._own is None:
            self._own = load_inputs(self.text, labels=self.labels, normalize=self._normalization())
        return self._own

    def named(self, role: str) -> Dataset:
        split = self.split if self.split is not None and role == self.split_role else None
        split = split or ("train" if role == "fuse" else "test")
        if split not in self._named:
            try:
                self._named[split] = load_dataset(self.text, split, self.data_dir)
            except DataError as exc:  # the library says data_dir; here it is a flag
                raise DataError(str(exc).replace("data_dir", "--data-dir")) from exc
        return self._named[split]

    def fusion_inputs(self) -> torch.Tensor | Dataset:
        """What fusion and alignment sample from: the train split, or own inputs."""
        return self.named("fuse") if self.is_named else self.own().inputs

    def eval_set(self, needed_by: str) -> Dataset:
        """Labelled examples to evaluate on: the test split, or own inputs with labels."""
        if self.is_named:
            return self.named("eval")
        own = self.own()
        if own.labels is None:
            where = (
                "a dict with 'inputs' and 'labels'"
                if own.kind == "tensor file"
                else "one sub-folder per class"
            )
            raise DataError(
                f"{self.text} holds no labels, which {needed_by} needs; save them with the inputs "
                f"({where}) or pass --labels FILE"
            )
        return own.dataset()

    def input_shape(self) -> tuple[int, ...]:
        if self.is_named:
            return tuple(dataset_info(self.text).shape)
        return self.own().input_shape

    def first_inputs(self, role: str = "fuse") -> torch.Tensor:
        """Two inputs for a trial forward pass."""
        return self.named(role).images[:2] if self.is_named else self.own().inputs[:2]

    def what(self) -> str:
        return (
            f"{dataset_info(self.text).name} images"
            if self.is_named
            else f"the inputs of {self.text}"
        )

    def model_defaults(self) -> dict[str, object]:
        """Arguments of a zoo model the data implies: its input shape (and a named dataset's classes)."""
        if self.is_named:
            info = dataset_info(self.text)
            return {"in_shape": info.shape, "num_classes": len(info.classes)}
        return {"in_shape": self.input_shape()}

    def num_classes(self) -> int | None:
        return len(dataset_info(self.text).classes) if self.is_named else None

    def describe(self, role: str | None = None) -> dict[str, Any]:
        """What a run's metadata records about the data (``role``: "fuse" or "eval")."""
        if self.is_named:
            out: dict[str, Any] = {"name": dataset_info(self.text).name}
            if role is not None:
                out["split"] = self.named(role).split
            return out
        described = self.own().describe()
        if self.labels is not None:
            described["labels_file"] = self.labels
        if self.normalize is not None:
            described["normalize"] = self.normalize
        return described

    def _normalization(self) -> tuple[Any, Any] | None:
        spec = self.normalize
        if spec is None or spec.strip().lower() == "none":
            return None
        if is_dataset_name(spec):
            info = dataset_info(spec)
            return info.mean, info.std
        kwargs = parse_kwargs(spec, f"--normalize {spec}")
        if set(kwargs) != {"mean", "std"}:
            raise UsageError(
                f"--normalize {spec}: give a dataset name ({', '.join(dataset_names())}) or "
                "mean=M,std=S"
            )
        values = []
        for key in ("mean", "std"):
            value = kwargs[key]
            value = value if isinstance(value, tuple) else (value,)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise UsageError(f"--normalize {spec}: {key} must be a number or (m1,m2,...)")
            values.append(tuple(float(v) for v in value))
        return values[0], values[1]
