# Runs inside gimp-console-3 via python-fu-eval:
#   gimp-console-3 -i --batch-interpreter=python-fu-eval \
#     -b "p='/tmp/cc_smoke/batch.py'; exec(compile(open(p).read(), p, 'exec'), {})" --quit
# Reads /tmp/cc_smoke/params.json, writes /tmp/cc_smoke/result.json.
# params: {"input": png, "output": png, "cases": [spec, ...], "server_url": url or null,
#          "final": "ok" | "raise"}   ("raise" makes the batch command fail -> gimp exits 64)
import json
import sys
import traceback

import gi
gi.require_version('Gimp', '3.0')
gi.require_version('Gegl', '0.4')
from gi.repository import Gimp, Gegl, Gio

DIR = '/tmp/cc_smoke'
P = json.load(open(DIR + '/params.json'))
FMT = "R'G'B'A u8"
PROC = 'python-fu-cc-smoke'
res = {'python_batch': sys.version.split()[0], 'cases': {}}

pdb = Gimp.get_pdb()
proc = pdb.lookup_procedure(PROC)
res['found'] = proc is not None
res['menu_label'] = proc.get_menu_label()
res['menu_paths'] = list(proc.get_menu_paths())
res['image_types'] = proc.get_image_types()
res['arguments'] = [a.name for a in proc.get_arguments()]
res['return_values'] = [a.name for a in proc.get_return_values()]
res['query_by_menu_regex'] = list(pdb.query_procedures('cc-smoke', '', '', '', '', '', '', ''))
res['undo_procs'] = sorted(pdb.query_procedures('.*undo.*', '', '', '', '', '', '', ''))


def pixels(drawable):
    w, h = drawable.get_width(), drawable.get_height()
    return bytes(drawable.get_buffer().get(Gegl.Rectangle.new(0, 0, w, h), 1.0, FMT,
                                           Gegl.AbyssPolicy.CLAMP))


def invert(buf):
    out = bytearray(buf)
    for i in range(0, len(out), 4):
        out[i] ^= 0xFF; out[i + 1] ^= 0xFF; out[i + 2] ^= 0xFF
    return bytes(out)


def server_pattern(w, h):
    return bytes(v for y in range(h) for x in range(w) for v in ((7 * x) % 256, (11 * y) % 256, 200, 255))


last_image = None
for spec in P['cases']:
    c = {}
    try:
        image = Gimp.file_load(Gimp.RunMode.NONINTERACTIVE, Gio.File.new_for_path(P['input']))
        layer = image.get_layers()[0]
        before = pixels(layer)
        c['n_layers_before'] = len(image.get_layers())
        c['undo_enabled'] = image.undo_is_enabled()
        c['dirty_before'] = image.is_dirty()
        cfg = proc.create_config()
        cfg.set_property('run-mode', Gimp.RunMode.NONINTERACTIVE)
        cfg.set_property('image', image)
        cfg.set_core_object_array('drawables', [layer])
        cfg.set_property('spec', spec)
        result = proc.run(cfg)
        status = result.index(0)
        c['status'] = status.value_nick
        c['result_len'] = result.length()
        c['pdb_last_status'] = pdb.get_last_status().value_nick
        c['pdb_last_error'] = pdb.get_last_error()
        if status == Gimp.PDBStatusType.SUCCESS:
            c['info'] = json.loads(result.index(1))
            layers = image.get_layers()
            top = layers[0]
            c['n_layers_after'] = len(layers)
            c['top_name'] = top.get_name()
            c['dirty_after'] = image.is_dirty()
            got = pixels(top)
            w, h = top.get_width(), top.get_height()
            want = server_pattern(w, h) if spec.startswith('http://') else invert(before)
            c['pixels_ok'] = got == want
            c['source_untouched'] = pixels(layers[1]) == before
        if status == Gimp.PDBStatusType.SUCCESS and last_image is None:
            last_image = image
        else:
            image.delete()  # avoids 'a stray image seems to have been left around'
    except Exception:
        c['exception'] = traceback.format_exc()
    res['cases'][spec] = c

if last_image is not None and P.get('output'):
    out = Gio.File.new_for_path(P['output'])
    res['saved'] = Gimp.file_save(Gimp.RunMode.NONINTERACTIVE, last_image, out, None)
    again = Gimp.file_load(Gimp.RunMode.NONINTERACTIVE, out)
    res['reloaded_layers'] = len(again.get_layers())
    res['reloaded_top_pixels_equal'] = pixels(again.get_layers()[0]) == pixels(last_image.get_layers()[0])
    again.delete()
if last_image is not None:
    last_image.delete()

with open(DIR + '/result.json', 'w') as f:
    json.dump(res, f, indent=1, default=str)

final = P.get('final', 'ok')
if final == 'raise':
    raise RuntimeError('batch.py: raising on purpose')
