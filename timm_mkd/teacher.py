"""Building the frozen teacher: timm name, module, or local checkpoint file.

timm's ``DistillationTeacher`` loads a teacher by name with hub weights. Users here also have
teachers they trained themselves with timm's train.py (``.pth.tar`` with ``state_dict`` /
``state_dict_ema``), exported with ``save_file`` (``.safetensors``), or saved as a bare
``.pth`` state dict; none of these load through train.py's ``--kd-model-name``. This module
loads all of them with ``weights_only=True`` (no pickle code execution) and checks, before any
training step, the mistakes that otherwise surface much later or silently: a checkpoint for
another class count or architecture, and a channel count that differs from the student's.
"""
import logging
import os
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from timm.data.loader import adapt_to_chs
from timm.models import clean_state_dict, create_model, is_model
from timm.task import DistillationTeacher
from timm.utils import unwrap_model

_logger = logging.getLogger(__name__)


class TeacherLoadError(RuntimeError):
    """A named teacher could not be created with timm's hub weights (offline, no such pretrained tag, ...)."""


def check_teacher_name(name: str) -> None:
    """Refuse a teacher name timm has no architecture for (``hf-hub:`` and other prefixed names pass).

    Raises:
        ValueError: naming the unknown architecture and how to list timm's names.
    """
    if ':' not in name and not is_model(name):
        raise ValueError(
            f"unknown teacher model '{name}': timm has no such architecture. Fix: pass a name from "
            f"timm.list_models() (e.g. timm.list_models('*{name.split('.')[0][:8]}*')) as --teacher.")

# Keys timm's CheckpointSaver and export helpers write, in the order timm's own
# ``load_checkpoint(use_ema=False)`` prefers them.
_STATE_DICT_KEYS = ('state_dict', 'model', 'state_dict_ema', 'model_ema')


def read_checkpoint(path: str):
    """Read a teacher checkpoint file once, safely: a safetensors dict, or what ``torch.load`` returns.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        ValueError: the file is corrupt or truncated.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"teacher checkpoint not found: '{path}'. Fix: pass an existing file to --teacher-checkpoint "
            f"(a timm train.py checkpoint such as output/train/RUN/model_best.pth.tar, or a .safetensors file).")
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        try:
            return load_file(path, device='cpu')
        except Exception as e:  # safetensors raises its own SafetensorError, or OSError
            raise ValueError(
                f"teacher checkpoint '{path}' is not a readable safetensors file ({type(e).__name__}: {e}). "
                f"Fix: re-export it with safetensors.torch.save_file(model.state_dict(), path).") from e
    from .safe_load import describe_load_error, load_checkpoint
    try:
        return load_checkpoint(path)
    except Exception as e:  # never pass on torch's advice to retry with weights_only=False
        raise ValueError(
            f"teacher checkpoint '{path}' could not be read with torch.load(weights_only=True) "
            f"({describe_load_error(e)}). It is corrupt, truncated, or pickles "
            f"objects other than tensors. Fix: point to a complete timm checkpoint or a .safetensors file.") from e


def load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """Read a model state dict from ``.safetensors``, ``.pth`` or ``.pth.tar`` safely.

    Args:
        path: checkpoint file.

    Returns:
        The state dict with DDP ``module.`` prefixes removed.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        ValueError: the file is corrupt, truncated, or holds no state dict.
    """
    return _state_dict_of(read_checkpoint(path), path)


def _state_dict_of(checkpoint, path: str) -> Dict[str, torch.Tensor]:
    """The model weights in what ``read_checkpoint`` returned, DDP ``module.`` prefixes removed."""
    return clean_state_dict(_extract_state_dict(checkpoint, path))


def training_normalization(checkpoint) -> Optional[Tuple[Sequence[float], Sequence[float]]]:
    """The ``--mean``/``--std`` a timm train.py checkpoint was trained with, if it records them.

    train.py saves its argparse namespace under ``args``; when the user overrode the
    normalisation (``--mean``/``--std``), that, not the architecture's ``pretrained_cfg``, is what
    the teacher saw during training, and what it must see again when it teaches.

    Args:
        checkpoint: what ``read_checkpoint`` returned.
    """
    args = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    mean, std = getattr(args, 'mean', None), getattr(args, 'std', None)
    if mean is None or std is None:
        return None
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _extract_state_dict(checkpoint, path: str) -> Dict[str, torch.Tensor]:
    if isinstance(checkpoint, dict):
        for key in _STATE_DICT_KEYS:
            if isinstance(checkpoint.get(key), dict):
                return checkpoint[key]
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return checkpoint
    raise ValueError(
        f"teacher checkpoint '{path}' holds no model weights: expected a state dict, or a dict with one of "
        f"{list(_STATE_DICT_KEYS)}.")


def _classifier_weight_key(model: nn.Module) -> Optional[str]:
    """Name of the classifier's weight in ``model.state_dict()``, found via ``get_classifier()``."""
    if not hasattr(model, 'get_classifier'):
        return None
    head = model.get_classifier()
    for name, module in model.named_modules():
        if module is head and isinstance(getattr(module, 'weight', None), torch.Tensor):
            return f'{name}.weight' if name else 'weight'
    return None


def load_teacher_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], path: str, num_classes: int) -> None:
    """Load ``state_dict`` into the teacher strictly, explaining mismatches in the user's terms."""
    head_key = _classifier_weight_key(model)
    if head_key is not None and head_key in state_dict:
        ckpt_classes = state_dict[head_key].shape[0]
        if ckpt_classes != num_classes:
            raise ValueError(
                f"teacher checkpoint '{path}' predicts {ckpt_classes} classes but the student predicts "
                f"{num_classes}: KD compares their logits class by class. Fix: use a teacher trained on the same "
                f"label set, or set the student's --num-classes {ckpt_classes}.")
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or mismatched:
        def _few(keys):
            return ', '.join(keys[:4]) + (' ...' if len(keys) > 4 else '')
        detail = '; '.join(s for s in (
            f'{len(missing)} missing ({_few(missing)})' if missing else '',
            f'{len(unexpected)} unexpected ({_few(unexpected)})' if unexpected else '',
            f'{len(mismatched)} with other shapes ({_few(mismatched)})' if mismatched else '',
        ) if s)
        raise ValueError(
            f"teacher checkpoint '{path}' does not fit architecture '{type(model).__name__}': {detail}. "
            f"Fix: pass the model name the checkpoint was trained with as --teacher (and the same --in-chans).")
    model.load_state_dict(state_dict, strict=True)


def build_teacher(
        teacher: Union[str, nn.Module, DistillationTeacher],
        student_model: nn.Module,
        checkpoint_path: Optional[str] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        student_mean: Optional[Sequence[float]] = None,
        student_std: Optional[Sequence[float]] = None,
) -> DistillationTeacher:
    """Build a frozen, eval-mode timm ``DistillationTeacher`` that matches the student.

    Args:
        teacher: timm model name, an ``nn.Module``, or a ready ``DistillationTeacher``.
        student_model: the student; its ``num_classes`` and ``in_chans`` are what the teacher must match.
        checkpoint_path: optional local weights (``.safetensors``, ``.pth``, ``.pth.tar``) for a named teacher.
            Without it a named teacher loads timm's hub weights.
        device: device for the teacher.
        dtype: dtype for the teacher (``None``: float32).
        student_mean: normalisation the student's loader applies; used for the teacher when the
            teacher's own ``pretrained_cfg`` statistics cannot describe its input channels.
        student_std: as ``student_mean``.

    Returns:
        A ``DistillationTeacher`` with every parameter frozen.

    Raises:
        ValueError: an unknown teacher name, a corrupt checkpoint, or a teacher that does not fit the student
            (class count, input channels, architecture of the checkpoint).
        FileNotFoundError: ``checkpoint_path`` does not exist.
        TeacherLoadError: a named teacher without ``checkpoint_path`` whose hub weights could not be loaded.
        TypeError: ``teacher`` is none of the accepted types (a programming error).
    """
    student = unwrap_model(student_model)
    num_classes = getattr(student, 'num_classes', None)
    in_chans = getattr(student, 'in_chans', 3)

    if isinstance(teacher, DistillationTeacher):
        wrapped = teacher
    elif isinstance(teacher, str):
        check_teacher_name(teacher)
        if checkpoint_path:
            checkpoint = read_checkpoint(checkpoint_path)  # read once: weights and recorded normalisation
            state_dict = _state_dict_of(checkpoint, checkpoint_path)
            model = create_model(teacher, pretrained=False, num_classes=num_classes, in_chans=in_chans)
            load_teacher_weights(model, state_dict, checkpoint_path, num_classes)
            model.to(device=device, dtype=dtype)
            _logger.info(f"Loaded KD teacher '{teacher}' from '{checkpoint_path}'")
            wrapped = DistillationTeacher(model, device=device, dtype=dtype)
            trained_with = training_normalization(checkpoint)
            if trained_with is not None:
                _set_normalization(wrapped, *trained_with, in_chans)
        else:
            try:
                wrapped = DistillationTeacher(
                    teacher, num_classes=num_classes, in_chans=in_chans, device=device, dtype=dtype)
            except (OSError, RuntimeError) as e:
                raise TeacherLoadError(
                    f"could not create teacher '{teacher}' with pretrained hub weights ({type(e).__name__}: {e}). "
                    f"Fix: pass local weights with --teacher-checkpoint FILE (teacher_pretrained_path=FILE).") from e
    elif isinstance(teacher, nn.Module):
        wrapped = DistillationTeacher(teacher, device=device, dtype=dtype)
    else:
        raise TypeError(f"teacher must be a timm model name, nn.Module or DistillationTeacher, got {type(teacher).__name__}")

    _check_teacher_matches(wrapped, num_classes, in_chans)
    _fix_teacher_normalization(wrapped, in_chans, student_mean, student_std)
    wrapped.eval()
    for p in wrapped.parameters():
        p.requires_grad_(False)
    return wrapped


def _check_teacher_matches(teacher: DistillationTeacher, num_classes: Optional[int], in_chans: int) -> None:
    model = unwrap_model(teacher.model)
    t_classes = getattr(model, 'num_classes', None)
    if num_classes is not None and t_classes is not None and t_classes != num_classes:
        raise ValueError(
            f"teacher predicts {t_classes} classes but the student predicts {num_classes}. "
            f"Fix: use a teacher for the same label set (or create it with num_classes={num_classes}).")
    t_chans = getattr(model, 'in_chans', None)
    if t_chans is not None and t_chans != in_chans:
        raise ValueError(
            f"teacher expects {t_chans} input channels but the student gets {in_chans}. "
            f"Fix: create the teacher with in_chans={in_chans} (train.py: the same --in-chans for both).")


def _fix_teacher_normalization(teacher: DistillationTeacher, in_chans: int, student_mean, student_std) -> None:
    """Make the teacher's mean/std describe exactly ``in_chans`` channels.

    timm's ``DistillationTeacher`` takes mean/std from the teacher's ``pretrained_cfg``, which
    keeps ImageNet's 3 values even for a 1-channel model; re-normalising a 1-channel batch with
    them broadcasts it to 3 channels. timm's loaders reduce mismatched statistics to their
    average (``adapt_to_chs``), which is what a teacher trained with train.py saw, so we apply
    the same rule. A teacher without any statistics falls back to the student's.
    """
    mean, std = teacher.mean_kd.flatten().tolist(), teacher.std_kd.flatten().tolist()
    if len(mean) == in_chans and len(std) == in_chans:
        return
    if not mean and student_mean is not None:
        mean, std = list(student_mean), list(student_std)
    _set_normalization(teacher, mean, std, in_chans)


def _set_normalization(teacher: DistillationTeacher, mean, std, in_chans: int) -> None:
    """Replace the teacher's mean/std buffers, reduced to ``in_chans`` values as timm's loaders do."""
    mean, std = adapt_to_chs(tuple(mean), in_chans), adapt_to_chs(tuple(std), in_chans)
    like = teacher.mean_kd
    teacher.mean_kd = torch.tensor(mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
    teacher.std_kd = torch.tensor(std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)


def match_student_normalization(task: nn.Module, student_model: nn.Module, mean: Sequence[float],
                                std: Sequence[float]) -> nn.Module:
    """Make one of timm's distillation tasks undo the normalisation the student's loader really applies.

    timm's ``LogitDistillationTask``, ``FeatureDistillationTask`` and ``TokenDistillationTask`` record
    the student's normalisation from its ``pretrained_cfg`` (three ImageNet values), and the teacher
    re-normalises every batch from it (``DistillationTeacher.normalize_input``). train.py's loaders
    normalise with ``--mean``/``--std`` reduced to ``--in-chans`` channels instead. On 1-channel data
    the three values broadcast the batch to three channels (the teacher's conv then refuses it); on
    RGB data with ``--mean``/``--std`` the teacher sees wrongly scaled images. This replaces the
    task's ``student_mean``/``student_std`` buffers with the loader's values (``MKDTask`` takes them
    as arguments already). timm 1.0.27's ``TokenDistillationTask`` also wraps a given teacher in its
    own ``TokenDistillationTeacher`` with ImageNet statistics; that wrapper gets the statistics of the
    ``DistillationTeacher`` it wraps.

    Args:
        task: a timm distillation task with ``student_mean``/``student_std`` buffers (others are
            returned unchanged).
        student_model: the student; its ``in_chans`` is the channel count of the batches.
        mean: normalisation mean the student's loader applies.
        std: normalisation std the student's loader applies.

    Returns:
        ``task``.
    """
    old_mean, old_std = getattr(task, 'student_mean', None), getattr(task, 'student_std', None)
    if not isinstance(old_mean, torch.Tensor) or not isinstance(old_std, torch.Tensor) or mean is None or std is None:
        return task
    in_chans = getattr(unwrap_model(student_model), 'in_chans', 3)
    mean, std = adapt_to_chs(tuple(mean), in_chans), adapt_to_chs(tuple(std), in_chans)
    task.student_mean = torch.tensor(mean, device=old_mean.device, dtype=old_mean.dtype).view(1, -1, 1, 1)
    task.student_std = torch.tensor(std, device=old_std.device, dtype=old_std.dtype).view(1, -1, 1, 1)
    wrapper = getattr(task, 'teacher', None)
    inner = getattr(wrapper, 'model', None)
    if isinstance(inner, DistillationTeacher) and not isinstance(wrapper, DistillationTeacher):
        wrapper.mean_kd, wrapper.std_kd = inner.mean_kd.clone(), inner.std_kd.clone()
    return task
