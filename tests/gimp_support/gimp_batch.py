# Runs INSIDE real GIMP 3 (gimp-console-3, python-fu-eval), driven by tests/test_gimp_real.py:
#   gimp-console-3 -i --batch-interpreter=python-fu-eval \
#     -b "p='/tmp/W/gimp_batch.py'; exec(compile(open(p).read(), p, 'exec'), {'PARAMS': '/tmp/W/params.json'})" --quit
# For each case it loads the PNG, moves its layer to the given offsets on a bigger canvas
# with a white "paper" layer below, selects a rectangle when the case says so, runs one
# Filters > ControlNet procedure non-interactively with the given arguments, and records
# the status, the PDB error, the return values, the layer tree (new layers' pixels and
# layer masks dumped as raw files), the source layer before/after, what the whole image
# looks like before/after (merged copies) and the paths.  Writes PARAMS' "work"/results.json.
import json
import os
import traceback

import gi
gi.require_version('Gimp', '3.0')
gi.require_version('Gegl', '0.4')
from gi.repository import Gegl, Gimp, Gio  # noqa: E402

P = json.load(open(PARAMS))  # noqa: F821 - given by the -b command
WORK = P['work']
FMT = "R'G'B'A u8"
pdb = Gimp.get_pdb()
results = {'procedures': {}, 'cases': {}}


def pixels(drawable):
    w, h = drawable.get_width(), drawable.get_height()
    return bytes(drawable.get_buffer().get(Gegl.Rectangle.new(0, 0, w, h), 1.0, FMT,
                                           Gegl.AbyssPolicy.CLAMP))


def looks(image):
    """The image as GIMP shows it: the visible layers of a copy, merged."""
    copy = image.duplicate()
    merged = copy.merge_visible_layers(Gimp.MergeType.CLIP_TO_IMAGE)
    data = pixels(merged)
    copy.delete()
    return data


def dump(name, data):
    with open(os.path.join(WORK, name), 'wb') as handle:
        handle.write(data)
    return name


def tree(case_id, items, counter):
    out = []
    for item in items:
        _, x, y = item.get_offsets()
        node = {'name': item.get_name(), 'x': x, 'y': y, 'w': item.get_width(),
                'h': item.get_height(), 'group': item.is_group_layer()}
        if node['group']:
            node['children'] = tree(case_id, item.get_children(), counter)
        else:
            counter[0] += 1
            node['pixels'] = dump('%s-layer%d.rgba' % (case_id, counter[0]), pixels(item))
            mask = item.get_mask()
            if mask is not None:
                rect = Gegl.Rectangle.new(0, 0, node['w'], node['h'])
                node['mask'] = dump('%s-mask%d.y' % (case_id, counter[0]), bytes(
                    mask.get_buffer().get(rect, 1.0, 'Y u8', Gegl.AbyssPolicy.CLAMP)))
        out.append(node)
    return out


def paths_of(image):
    out = []
    for path in image.get_paths():
        parasite = path.get_parasite('controlcanvas-pose')
        out.append({
            'name': path.get_name(),
            'strokes': [list(path.stroke_get_points(sid)[1]) for sid in path.get_strokes()],
            'meta': bytes(parasite.get_data()).decode() if parasite is not None else None,
        })
    return out


def all_layers(items):
    for item in items:
        yield item
        if item.is_group_layer():
            yield from all_layers(item.get_children())


def setup_image(reference=None):
    image = Gimp.file_load(Gimp.RunMode.NONINTERACTIVE, Gio.File.new_for_path(P['input']))
    source = image.get_layers()[0]
    source.set_name('lines')
    cw, ch = P['canvas']
    ox, oy = P['offsets']
    image.resize(cw, ch, ox, oy)  # moves the layer to (ox, oy)
    paper = Gimp.Layer.new(image, 'paper', cw, ch, Gimp.ImageType.RGBA_IMAGE, 100,
                           Gimp.LayerMode.NORMAL)
    image.insert_layer(paper, None, 1)
    shadow = paper.get_shadow_buffer()
    shadow.set(Gegl.Rectangle.new(0, 0, cw, ch), FMT, b'\xff\xff\xff\xff' * (cw * ch))
    shadow.flush()
    paper.merge_shadow(True)
    if reference:  # another layer of the image: a picture the artist pasted, hidden, in a
        # layer group on top
        group = Gimp.GroupLayer.new(image, reference['group'])
        image.insert_layer(group, None, 0)
        ref = Gimp.file_load_layer(Gimp.RunMode.NONINTERACTIVE, image,
                                   Gio.File.new_for_path(reference['png']))
        ref.set_name(reference['name'])
        image.insert_layer(ref, group, 0)
        ref.set_offsets(*reference['offsets'])
        ref.set_visible(False)
    return image, source


for name in pdb.query_procedures('python-fu-controlcanvas-.*', '', '', '', '', '', '', ''):
    proc = pdb.lookup_procedure(name)
    results['procedures'][name] = {
        'label': proc.get_menu_label(), 'menu_paths': list(proc.get_menu_paths()),
        'arguments': [a.name for a in proc.get_arguments()],
        'return_values': [a.name for a in proc.get_return_values()],
    }

for case in P['cases']:
    cid = case['id']
    c = results['cases'][cid] = {}
    image = None
    try:
        image, source = setup_image(case.get('reference'))
        existing = [(item, pixels(item)) for item in all_layers(image.get_layers())
                    if not item.is_group_layer()]
        if case.get('select'):
            image.select_rectangle(Gimp.ChannelOps.REPLACE, *case['select'])
        before = pixels(source)
        c['source_before'] = dump(cid + '-source.rgba', before)
        c['looks_before'] = dump(cid + '-looks-before.rgba', looks(image))
        proc = pdb.lookup_procedure(case['proc'])
        cfg = proc.create_config()
        cfg.set_property('run-mode', Gimp.RunMode.NONINTERACTIVE)
        cfg.set_property('image', image)
        cfg.set_core_object_array('drawables', [source])
        for key, value in case['args'].items():
            cfg.set_property(key, value)
        result = proc.run(cfg)
        status = result.index(0)
        c['status'] = status.value_nick
        c['error'] = pdb.get_last_error() if status != Gimp.PDBStatusType.SUCCESS else None
        if status == Gimp.PDBStatusType.SUCCESS:
            returned = {}
            for index, arg in enumerate(proc.get_return_values(), start=1):
                value = result.index(index)
                returned[arg.name] = value.get_name() if hasattr(value, 'get_name') else value
            c['returned'] = returned
        c['layers'] = tree(cid, image.get_layers(), [0])
        c['looks_after'] = dump(cid + '-looks-after.rgba', looks(image))
        c['source_unchanged'] = pixels(source) == before
        c['old_layers_unchanged'] = {item.get_name(): pixels(item) == data
                                     for item, data in existing}
        _, sx, sy = source.get_offsets()
        c['source_offsets'] = [sx, sy]
        c['paths'] = paths_of(image)
        if case.get('save'):
            out = os.path.join(WORK, cid + '.xcf')
            c['saved'] = Gimp.file_save(Gimp.RunMode.NONINTERACTIVE, image,
                                        Gio.File.new_for_path(out), None)
            again = Gimp.file_load(Gimp.RunMode.NONINTERACTIVE, Gio.File.new_for_path(out))
            c['reloaded'] = tree(cid + '-reloaded', again.get_layers(), [0])
            c['reloaded_paths'] = paths_of(again)
            kept = again.get_parasite('controlcanvas.history')  # the result history
            c['reloaded_history'] = bytes(v & 0xFF for v in kept.get_data()).decode() \
                if kept else None
            if case.get('rerun'):  # the same procedure on the reopened image
                lines = [l for l in again.get_layers() if l.get_name() == 'lines'][0]
                cfg = proc.create_config()
                cfg.set_property('run-mode', Gimp.RunMode.NONINTERACTIVE)
                cfg.set_property('image', again)
                cfg.set_core_object_array('drawables', [lines])
                for key, value in dict(case['args'], **case['rerun']).items():
                    cfg.set_property(key, value)
                rerun = proc.run(cfg)
                c['rerun'] = {'status': rerun.index(0).value_nick,
                              'error': pdb.get_last_error(),
                              'seed': rerun.index(1) if rerun.index(0) ==
                              Gimp.PDBStatusType.SUCCESS else None,
                              'layers': tree(cid + '-rerun', again.get_layers(), [0])}
            again.delete()
    except Exception:
        c['exception'] = traceback.format_exc()
    finally:
        if image is not None:
            image.delete()

with open(os.path.join(WORK, 'results.json'), 'w') as handle:
    json.dump(results, handle, indent=1, default=str)
