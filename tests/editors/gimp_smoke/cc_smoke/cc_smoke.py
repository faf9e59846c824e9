#!/usr/bin/env python3
# Minimal GIMP 3 plug-in used by tests/editors/gimp_smoke/run_smoke.sh.
# Registers python-fu-cc-smoke under <Image>/Filters/ControlNet. The string argument "spec":
#   "invert"          -> new layer = inverted RGB of the drawable (alpha kept)
#   "http://..."      -> new layer pixels fetched from that URL (?w=W&h=H appended), raw RGBA u8
#   "fail"            -> returns EXECUTION_ERROR with a message
#   "raise"           -> raises a Python exception
# Returns a JSON string "info" (python version, websockets availability, ...).
import importlib.util
import json
import sys
import urllib.request

import gi
gi.require_version('Gimp', '3.0')
gi.require_version('Gegl', '0.4')
from gi.repository import Gimp, Gegl, GLib, GObject

PROC = 'python-fu-cc-smoke'
FMT = "R'G'B'A u8"


def invert(buf):
    out = bytearray(buf)
    for i in range(0, len(out), 4):
        out[i] ^= 0xFF
        out[i + 1] ^= 0xFF
        out[i + 2] ^= 0xFF
    return bytes(out)


class CCSmoke(Gimp.PlugIn):
    def do_query_procedures(self):
        return [PROC]

    def do_set_i18n(self, name):
        return False

    def do_create_procedure(self, name):
        proc = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, self.run, None)
        proc.set_image_types('*')
        proc.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.DRAWABLE)
        proc.set_menu_label('CC Smoke Test')
        proc.add_menu_path('<Image>/Filters/ControlNet')
        proc.set_documentation('ControlCanvas smoke test', 'Reads the drawable, adds a layer', name)
        proc.set_attribution('ControlCanvas', 'ControlCanvas', '2026')
        proc.add_string_argument('spec', 'Spec', 'invert | http://... | fail | raise', 'invert',
                                 GObject.ParamFlags.READWRITE)
        proc.add_string_return_value('info', 'Info', 'JSON info', '', GObject.ParamFlags.READWRITE)
        return proc

    def run(self, procedure, run_mode, image, drawables, config, data):
        spec = config.get_property('spec')
        Gimp.message('cc-smoke: spec=%s' % spec)
        if len(drawables) != 1:
            return procedure.new_return_values(Gimp.PDBStatusType.CALLING_ERROR,
                                               GLib.Error('cc-smoke: need exactly one drawable'))
        if spec == 'fail':
            return procedure.new_return_values(Gimp.PDBStatusType.EXECUTION_ERROR,
                                               GLib.Error('cc-smoke: asked to fail'))
        if spec == 'raise':
            raise RuntimeError('cc-smoke: python exception on purpose')

        drawable = drawables[0]
        w, h = drawable.get_width(), drawable.get_height()
        rect = Gegl.Rectangle.new(0, 0, w, h)
        src = drawable.get_buffer().get(rect, 1.0, FMT, Gegl.AbyssPolicy.CLAMP)
        if spec.startswith('http://'):
            with urllib.request.urlopen('%s?w=%d&h=%d' % (spec, w, h), timeout=10) as r:
                pixels = r.read()
        else:
            pixels = invert(src)
        if len(pixels) != w * h * 4:
            return procedure.new_return_values(Gimp.PDBStatusType.EXECUTION_ERROR,
                                               GLib.Error('cc-smoke: got %d bytes' % len(pixels)))

        undo_start = image.undo_group_start()
        layer = Gimp.Layer.new(image, 'cc-smoke', w, h, Gimp.ImageType.RGBA_IMAGE, 100,
                               Gimp.LayerMode.NORMAL)
        image.insert_layer(layer, None, 0)
        ok, ox, oy = drawable.get_offsets()
        layer.set_offsets(ox, oy)
        shadow = layer.get_shadow_buffer()
        shadow.set(rect, FMT, pixels)
        shadow.flush()
        layer.merge_shadow(True)
        layer.update(0, 0, w, h)
        undo_end = image.undo_group_end()
        Gimp.displays_flush()

        info = json.dumps({
            'python': sys.version.split()[0],
            'websockets': importlib.util.find_spec('websockets') is not None,
            'src_len': len(src), 'src_type': type(src).__name__,
            'undo_group_start': undo_start, 'undo_group_end': undo_end,
            'run_mode': int(run_mode),
        })
        retval = procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, None)
        retval.remove(1)
        retval.insert(1, GObject.Value(GObject.TYPE_STRING, info))
        return retval


Gimp.main(CCSmoke.__gtype__, sys.argv)
