"""Export the best student of a train.py / train-mkd run: ``model.safetensors`` + ``mkd_student.json``.

    python -m timm_mkd.export RUN_DIR [--out DIR] [--checkpoint FILE] [--ema]
    train-mkd ... --mkd --mkd-export DIR        # the same, when the run ends

``RUN_DIR`` is train.py's output folder of one run (``--output``/``--experiment``); the best
student is its ``model_best.pth.tar`` (else ``last.pth.tar``). The checkpoint is read with
``torch.load(weights_only=True)``. Written to ``--out`` (default ``RUN_DIR``):

- ``model.safetensors``: the student's weights (``--ema``: the EMA weights);
- ``mkd_student.json``: the learned temperatures (``tau_t``, ``tau_s``, meta steps; null for a
  run without MKD), the checkpoint's epoch and metric, train.py's args, and ``create_model``:
  the keyword arguments that rebuild the student, e.g.::

      cfg = json.load(open('DIR/mkd_student.json'))['create_model']
      model = timm.create_model(**cfg)      # pretrained=True, pretrained_cfg_overlay=dict(file=...)

  ``file`` is the absolute path at export time; ``load_student(DIR)`` rebuilds it from wherever
  ``DIR`` is now.
"""
import argparse
import json
import math
import os
import sys
from typing import Any, Dict, Optional

__all__ = ['EXPORT_JSON', 'WEIGHTS_FILE', 'ExportError', 'find_checkpoint', 'export_run', 'load_student', 'main']

EXPORT_JSON = 'mkd_student.json'
WEIGHTS_FILE = 'model.safetensors'
FORMAT = 'timm-mkd-student/1'
_CHECKPOINT_NAMES = ('model_best.pth.tar', 'last.pth.tar')


class ExportError(ValueError):
    """The run folder or checkpoint cannot be exported; the message names the fix."""


def find_checkpoint(run_dir: str) -> str:
    """The best checkpoint of a run folder: ``model_best.pth.tar``, else ``last.pth.tar``.

    Args:
        run_dir: train.py's output folder of one run.
    Returns:
        The checkpoint path.
    Raises:
        ExportError: when neither exists.
    """
    if not os.path.isdir(run_dir):
        raise ExportError(f"run folder not found: '{run_dir}'. Fix: pass train.py's output folder of one run "
                          f"(e.g. output/train/RUN, the folder with model_best.pth.tar).")
    for name in _CHECKPOINT_NAMES:
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            return path
    raise ExportError(f"'{run_dir}' holds neither {' nor '.join(_CHECKPOINT_NAMES)}. Fix: pass the folder of a "
                      f"run that saved a checkpoint, or name the file with --checkpoint FILE.")


def _read(path: str) -> Dict[str, Any]:
    from .safe_load import describe_load_error, load_checkpoint
    try:
        checkpoint = load_checkpoint(path)
    except Exception as e:  # never pass on torch's advice to retry with weights_only=False
        raise ExportError(f"checkpoint '{path}' could not be read with torch.load(weights_only=True) "
                          f"({describe_load_error(e)}). Fix: export a complete checkpoint written by timm's "
                          f"train.py (model_best.pth.tar or last.pth.tar).") from e
    if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint:
        raise ExportError(f"checkpoint '{path}' has no 'state_dict': it was not written by timm's train.py. "
                          f"Fix: export model_best.pth.tar or last.pth.tar of a train.py run.")
    return checkpoint


def _jsonable(value: Any) -> Any:
    """train.py's arg values as JSON (tuples become lists, anything unusual its ``str``)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def temperatures(checkpoint: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The learned temperatures in a checkpoint's ``task_state`` (None for a run without MKD).

    Args:
        checkpoint: what ``torch.load`` returned.
    Returns:
        ``{'tau_t', 'tau_s', 'meta_steps', 'updates'}`` or None.
    """
    mkd = (checkpoint.get('task_state') or {}).get('mkd')
    if not mkd:
        return None
    return {'tau_t': float(mkd['log_tau_t'].exp()), 'tau_s': float(mkd['log_tau_s'].exp()),
            'meta_steps': int(mkd.get('meta_steps', 0)), 'updates': int(mkd.get('updates', 0))}


def _create_model_kwargs(args: Dict[str, Any], state_dict, weights: str) -> Dict[str, Any]:
    """``timm.create_model`` keywords that rebuild the student from ``weights`` (train.py's ``args``)."""
    model = args.get('model')
    if not model:
        raise ExportError("the checkpoint's args name no model. Fix: export a checkpoint written by timm's "
                          "train.py (it saves args.model).")
    input_size = args.get('input_size') or None
    in_chans = args.get('in_chans') or (input_size[0] if input_size else 3)
    kwargs = dict(args.get('model_kwargs') or {})
    num_classes = args.get('num_classes')
    # custom_load=False: some configs (e.g. ViT augreg) name a .npz loader that cannot read safetensors
    overlay = {'file': weights, 'custom_load': False}
    if num_classes is not None:
        kwargs['num_classes'] = overlay['num_classes'] = num_classes  # keeps timm from dropping the head
    if input_size:
        overlay['input_size'] = list(input_size)
    elif args.get('img_size'):
        overlay['input_size'] = [in_chans, args['img_size'], args['img_size']]
    for key in ('mean', 'std', 'crop_pct', 'interpolation'):
        if args.get(key):
            overlay[key] = args[key]
    kwargs.update(model_name=model, in_chans=in_chans, pretrained=True, pretrained_cfg_overlay=overlay)
    return _jsonable(kwargs)


def export_run(run_dir: str, out_dir: Optional[str] = None, checkpoint: Optional[str] = None,
               ema: bool = False) -> str:
    """Write ``model.safetensors`` and ``mkd_student.json`` for the best student of ``run_dir``.

    Args:
        run_dir: train.py's output folder of one run.
        out_dir: where to write (default ``run_dir``); created if needed.
        checkpoint: a specific checkpoint file instead of the best one.
        ema: export the EMA weights (``state_dict_ema``) instead of the student's.
    Returns:
        The path of the written ``model.safetensors``.
    Raises:
        ExportError: naming what is missing and the fix.
    """
    from safetensors.torch import save_file
    source = checkpoint or find_checkpoint(run_dir)
    ckpt = _read(source)
    key = 'state_dict_ema' if ema else 'state_dict'
    if key not in ckpt:
        raise ExportError(f"checkpoint '{source}' has no EMA weights. Fix: drop --ema (the run did not use "
                          f"--model-ema).")
    state_dict = {k[7:] if k.startswith('module.') else k: v.detach().clone().contiguous()
                  for k, v in ckpt[key].items()}
    out_dir = os.path.abspath(out_dir or run_dir)
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, WEIGHTS_FILE)
    args = _jsonable(vars(ckpt['args'])) if hasattr(ckpt.get('args'), '__dict__') else {}
    info = {
        'format': FORMAT,
        'checkpoint': os.path.abspath(source),
        'weights': 'state_dict_ema' if ema else 'state_dict',
        'epoch': ckpt.get('epoch'),
        'metric': _jsonable(ckpt.get('metric')),
        'temperatures': temperatures(ckpt),
        'create_model': _create_model_kwargs(args, state_dict, weights),
        'train_args': args,
    }
    save_file(state_dict, weights, metadata={'format': 'pt'})
    with open(os.path.join(out_dir, EXPORT_JSON), 'w') as f:
        json.dump(info, f, indent=2, sort_keys=False)
        f.write('\n')
    return weights


def load_student(export_dir: str, **overrides):
    """Rebuild the exported student with ``timm.create_model`` from ``export_dir``, wherever it now is.

    Args:
        export_dir: the folder ``export_run`` wrote.
        **overrides: extra ``create_model`` keywords (e.g. ``drop_rate``).
    Returns:
        The model, weights loaded (strictly), in train mode as timm returns it.
    """
    import timm
    with open(os.path.join(export_dir, EXPORT_JSON)) as f:
        kwargs = json.load(f)['create_model']
    kwargs['pretrained_cfg_overlay']['file'] = os.path.join(os.path.abspath(export_dir), WEIGHTS_FILE)
    kwargs.update(overrides)
    return timm.create_model(**kwargs)


def main(argv=None) -> None:
    """Command line: ``python -m timm_mkd.export RUN_DIR [--out DIR] [--checkpoint FILE] [--ema]``."""
    parser = argparse.ArgumentParser(
        prog='python -m timm_mkd.export',
        description='Write the best student of a train.py / train-mkd run as model.safetensors plus '
                    f'{EXPORT_JSON} (learned temperatures, train.py args, timm.create_model keywords).')
    parser.add_argument('run_dir', metavar='RUN_DIR', help="train.py's output folder of one run")
    parser.add_argument('--out', metavar='DIR', help='where to write (default: RUN_DIR)')
    parser.add_argument('--checkpoint', metavar='FILE', help='export this checkpoint instead of the best one')
    parser.add_argument('--ema', action='store_true', help='export the EMA weights (state_dict_ema)')
    args = parser.parse_args(argv)
    try:
        weights = export_run(args.run_dir, args.out, args.checkpoint, args.ema)
    except ExportError as e:
        parser.exit(1, f'{parser.prog}: error: {e}\n')
    with open(os.path.join(os.path.dirname(weights), EXPORT_JSON)) as f:
        temps = json.load(f)['temperatures']
    learned = f"tau_t={temps['tau_t']:.4f} tau_s={temps['tau_s']:.4f}" if temps else 'no MKD temperatures'
    sys.stdout.write(f'wrote {weights} and {EXPORT_JSON} ({learned})\n')


if __name__ == '__main__':
    main()
