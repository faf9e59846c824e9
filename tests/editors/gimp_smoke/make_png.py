"""Write a small RGBA PNG with a known pattern (stdlib only). Usage: make_png.py OUT W H"""
import struct
import sys
import zlib


def pattern(w, h):
    """Input image pattern: r = 20*x, g = 30*y, b = 100, a = 255."""
    return bytes(v for y in range(h) for x in range(w) for v in ((20 * x) % 256, (30 * y) % 256, 100, 255))


def write_png(path, w, h, rgba):
    def chunk(tag, data):
        c = tag + data
        return struct.pack('>I', len(data)) + c + struct.pack('>I', zlib.crc32(c) & 0xFFFFFFFF)
    raw = b''.join(b'\x00' + rgba[y * w * 4:(y + 1) * w * 4] for y in range(h))
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 6, 0, 0, 0))
                + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


if __name__ == '__main__':
    out, w, h = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    write_png(out, w, h, pattern(w, h))
