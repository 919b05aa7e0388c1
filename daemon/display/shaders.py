"""GLSL sources of the display, for OpenGL 3.3 core and OpenGL ES 3.0.

One body per shader; :func:`source` prepends the header of the context's
dialect (``#version 330 core``, or ``#version 300 es`` with default
precisions). Both dialects have ``texelFetch``, ``textureSize`` and unsigned
integer samplers, which the overlay needs: the label map is an ``R8UI``
texture read texel by texel (never filtered: labels are not numbers to blend).
Confidence maps are ``R16F`` textures, which both filter bilinearly.
"""

from __future__ import annotations

from typing import Literal

Dialect = Literal["gl33", "gles30"]

_HEADERS: dict[Dialect, str] = {
    "gl33": "#version 330 core\n",
    "gles30": (
        "#version 300 es\n"
        "precision highp float;\n"
        "precision highp int;\n"
        "precision highp usampler2D;\n"
        "precision mediump sampler2D;\n"
    ),
}

# Label map styles, as the labels shader's u_mode.
MODE_FILLED, MODE_CONTOUR = 1, 2

# A quad given as a triangle strip in [0, 1]^2; it fills the current viewport. Texture row 0
# (the image's first row, the near field) is at the top of the screen.
QUAD_VERTEX = """
layout(location = 0) in vec2 a_pos;
out vec2 v_uv;
void main() {
    v_uv = vec2(a_pos.x, 1.0 - a_pos.y);
    gl_Position = vec4(a_pos * 2.0 - 1.0, 0.0, 1.0);
}
"""

# The frame: grey (via texture swizzle) or RGB.
IMAGE_FRAGMENT = """
in vec2 v_uv;
out vec4 o_colour;
uniform sampler2D u_image;
void main() {
    o_colour = vec4(texture(u_image, v_uv).rgb, 1.0);
}
"""

# A label map, blended over what is drawn (source alpha): label k has the colour lut[k].rgb
# at opacity lut[k].a * u_opacity. In contour mode a fragment is coloured only where its
# label differs from a neighbour's, u_step (in texture coordinates, about one line width)
# away, and then opaquely.
LABELS_FRAGMENT = """
in vec2 v_uv;
out vec4 o_colour;
uniform usampler2D u_labels;
uniform sampler2D u_lut;
uniform int u_mode;
uniform float u_opacity;
uniform vec2 u_step;

uint label_at(vec2 uv) {
    ivec2 size = textureSize(u_labels, 0);
    ivec2 p = clamp(ivec2(uv * vec2(size)), ivec2(0), size - 1);
    return texelFetch(u_labels, p, 0).r;
}

void main() {
    uint label = label_at(v_uv);
    vec4 lut = texelFetch(u_lut, ivec2(int(label), 0), 0);
    float alpha = lut.a;
    if (u_mode == 2) {
        bool edge = label_at(v_uv + vec2(u_step.x, 0.0)) != label
                 || label_at(v_uv - vec2(u_step.x, 0.0)) != label
                 || label_at(v_uv + vec2(0.0, u_step.y)) != label
                 || label_at(v_uv - vec2(0.0, u_step.y)) != label;
        alpha = (edge && alpha > 0.0) ? 1.0 : 0.0;
    }
    o_colour = vec4(lut.rgb, clamp(alpha * u_opacity, 0.0, 1.0));
}
"""

# A confidence map (float, 0..1, filtered bilinearly) through the heat lookup table,
# blended over what is drawn.
HEAT_FRAGMENT = """
in vec2 v_uv;
out vec4 o_colour;
uniform sampler2D u_heat;
uniform sampler2D u_lut;
uniform float u_opacity;

void main() {
    float v = clamp(texture(u_heat, v_uv).r, 0.0, 1.0);
    vec4 lut = texelFetch(u_lut, ivec2(int(v * 255.0 + 0.5), 0), 0);
    o_colour = vec4(lut.rgb, clamp(lut.a * u_opacity, 0.0, 1.0));
}
"""

# Text: an RGBA texture blended over the picture.
TEXT_FRAGMENT = """
in vec2 v_uv;
out vec4 o_colour;
uniform sampler2D u_text;
void main() {
    o_colour = texture(u_text, v_uv);
}
"""

# Solid shapes (box outlines, crosses, bars) as triangles in window pixels (origin at the
# top left, y down), one colour per vertex.
SOLID_VERTEX = """
layout(location = 0) in vec2 a_pos;
layout(location = 1) in vec4 a_colour;
uniform vec2 u_size;
out vec4 v_colour;
void main() {
    vec2 ndc = a_pos / u_size * 2.0 - 1.0;
    gl_Position = vec4(ndc.x, -ndc.y, 0.0, 1.0);
    v_colour = a_colour;
}
"""

SOLID_FRAGMENT = """
in vec4 v_colour;
out vec4 o_colour;
void main() {
    o_colour = v_colour;
}
"""


def source(body: str, dialect: Dialect) -> str:
    """``body`` with the version header (and precisions) of ``dialect``."""
    return _HEADERS[dialect] + body
