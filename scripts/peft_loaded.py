"""The check the PEFT reference scripts share: PEFT loaded a loraforge adapter with no
missing or unexpected keys and every tensor bit-exactly (imported by peft_classify.py,
peft_classify_image.py and peft_transcribe.py, which sit beside it)."""
import os
import sys


def check_loaded(model, adapter_dir):
    """Exits 1 unless `model` (a PeftModel) holds exactly the tensors of the adapter
    file in `adapter_dir`; prints a summary line on stderr either way."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    sd_file = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    sd_model = get_peft_model_state_dict(model)
    missing = sorted(set(sd_model) - set(sd_file))
    unexpected = sorted(set(sd_file) - set(sd_model))
    common = set(sd_model) & set(sd_file)
    diff = max((sd_model[k].float() - sd_file[k].float()).abs().max().item() for k in common) if common else 1.0
    print(f"PEFT: {len(sd_file)} tensors in file, {len(sd_model)} expected; missing {len(missing)} {missing[:3]}; "
          f"unexpected {len(unexpected)} {unexpected[:3]}; max |loaded - file| {diff:.3g}", file=sys.stderr)
    if missing or unexpected or diff != 0.0:
        sys.exit(1)
