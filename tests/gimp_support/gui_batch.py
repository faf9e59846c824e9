# Runs INSIDE the GUI GIMP 3 (gimp-3 under Xvfb, python-fu-eval), driven by gui_dialog.sh:
# opens the PNG in a window, calls "Generate from layer" INTERACTIVELY (GIMP's own dialog
# appears; the driver screenshots it and presses OK), records the layers, then waits for
# the driver to press Ctrl+Z in the image window and records the layers again.
import json
import os
import time

import gi
gi.require_version('Gimp', '3.0')
from gi.repository import Gimp, Gio  # noqa: E402

P = json.load(open(PARAMS))  # noqa: F821 - given by the -b command
WORK = P['work']
out = {}


def layers(image):
    return [layer.get_name() for layer in image.get_layers()]


def wait_for(name, timeout=60):
    deadline = time.time() + timeout
    while not os.path.exists(os.path.join(WORK, name)):
        if time.time() > deadline:
            raise TimeoutError(name)
        time.sleep(0.2)


def save():
    with open(os.path.join(WORK, 'gui_results.json'), 'w') as handle:
        json.dump(out, handle, indent=1, default=str)


image = Gimp.file_load(Gimp.RunMode.NONINTERACTIVE, Gio.File.new_for_path(P['input']))
source = image.get_layers()[0]
if P.get('reference'):  # a pasted picture, hidden, below: the 'Reference layer'
    ref = Gimp.file_load_layer(Gimp.RunMode.NONINTERACTIVE, image,
                               Gio.File.new_for_path(P['reference']))
    ref.set_name('reference photo')
    image.insert_layer(ref, None, 1)
    ref.set_visible(False)
    image.clean_all()
Gimp.Display.new(image)
Gimp.displays_flush()
out['before'] = layers(image)
proc = Gimp.get_pdb().lookup_procedure('python-fu-controlcanvas-generate')
cfg = proc.create_config()
cfg.set_property('run-mode', Gimp.RunMode.INTERACTIVE)
cfg.set_property('image', image)
cfg.set_core_object_array('drawables', [source])
for key, value in P['args'].items():
    cfg.set_property(key, value)
open(os.path.join(WORK, 'dialog-requested'), 'w').close()
result = proc.run(cfg)
out['status'] = result.index(0).value_nick
out['error'] = Gimp.get_pdb().get_last_error()
out['after'] = layers(image)
out['undo_enabled'] = image.undo_is_enabled()
save()
open(os.path.join(WORK, 'generated'), 'w').close()
wait_for('undone')
deadline = time.time() + 5  # the undo runs in GIMP's core; give it a moment
while layers(image) == out['after'] and time.time() < deadline:
    time.sleep(0.1)
out['after_undo'] = layers(image)
save()
open(os.path.join(WORK, 'finished'), 'w').close()
