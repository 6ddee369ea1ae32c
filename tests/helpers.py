"""Helpers shared by the tests: driving the command line, recording a model's forward order."""

from __future__ import annotations

from hfmerge.cli import main


def run_cli(args, capsys):
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _is_stage_line(line):
    return line.startswith("hfmerge: ") and not line.startswith(("hfmerge: error:", "hfmerge: warning:"))


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    # what a terminal shows: a progress bar erased with carriage returns leaves no line behind
    lines = [shown for line in err.split("\n") if (shown := line.split("\r")[-1]).strip()]
    # the stage lines logged before the failure ("hfmerge: planned ... in 0.1 s") are progress, not messages
    lines = [line for line in lines if not _is_stage_line(line)]
    assert len(lines) == 1, err
    assert lines[0].startswith("hfmerge: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# Modules each family's output does not depend on: UperNet's auxiliary head feeds only the training loss,
# Mask2Former's criterion is the loss. Written here from the transformers source, not read from hfmerge.
NOT_LAYERS = {"upernet-convnext": ("auxiliary_head",), "upernet-swin": ("auxiliary_head",),
              "mask2former": ("criterion",)}


def recorded_forward_order(model, family, image_size, call=None, merged=lambda name: True):
    """(layers, not layers) of a real model, recorded by running it once on the CPU with hooks.

    A module's place is its first call. A module that owns parameters but is never called (an
    embedding read through ``.weight``) comes right after its nearest called ancestor's own
    tensors; one that owns only buffers and never runs is not a layer; the modules in
    ``NOT_LAYERS`` are not layers. ``call`` names the method that takes the images where the
    forward needs more (a CLIPModel's ``get_image_features``); tensors that ``merged`` rejects
    (a CLIPModel's text tower) are left out.
    """
    import torch

    first_call = []
    module_names = {module: name for name, module in model.named_modules()}

    def record(module, args):
        if module_names[module] not in first_call:
            first_call.append(module_names[module])

    handles = [module.register_forward_pre_hook(record) for module in module_names]
    with torch.no_grad():
        getattr(model.eval(), call or "__call__")(pixel_values=torch.rand(1, 3, image_size, image_size))
    for handle in handles:
        handle.remove()

    def owner(name):
        return name.rsplit(".", 1)[0] if "." in name else ""

    owners = list(dict.fromkeys(owner(n) for n in model.state_dict() if merged(n)))
    has_parameters = {owner(n) for n, _ in model.named_parameters() if merged(n)}
    uncalled = [o for o in owners if o not in first_call]
    attached = {}  # called module -> uncalled owners using its position
    for o in uncalled:
        if o in has_parameters:
            parent = o
            while parent not in first_call:
                parent = owner(parent) if parent else None
            attached.setdefault(parent, []).append(o)
    sequence = []
    for called in first_call:
        if called in owners:
            sequence.append(called)
        sequence.extend(attached.get(called, []))
    excluded = NOT_LAYERS.get(family, ())
    outside = [o for o in owners if o not in sequence or o.split(".")[0] in excluded]
    return [o for o in sequence if o not in outside], set(outside)
