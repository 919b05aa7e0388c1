"""GLSL sources of the display, for OpenGL 3.3 core and OpenGL ES 3.0.

One body per shader; :func:`source` prepends the header of the context's
dialect (``#version 330 core``, or ``#version 300 es`` with default
precisions). Both dialects have ``texelFetch``, ``textureSize`` and unsigned
integer samplers, which the overlay needs: the label map is an ``R8UI``
texture read texel by texel (never filtered: labels are not numbers to blend).
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

# Overlay modes, as the fragment shader's u_mode (a heatmap is "filled" with the heat LUT).
MODE_OFF, MODE_FILLED, MODE_CONTOUR = 0, 1, 2

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

# The frame (grey via texture swizzle, or RGB) with the overlay blended on top:
# colour = mix(image, lut[label].rgb, lut[label].a * u_opacity). In contour mode a
# fragment is coloured only where its label differs from a neighbour's, u_step (in
# texture coordinates, about one line width) away, and then opaquely.
OVERLAY_FRAGMENT = """
in vec2 v_uv;
out vec4 o_colour;
uniform sampler2D u_image;
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
    vec3 base = texture(u_image, v_uv).rgb;
    float alpha = 0.0;
    vec3 colour = base;
    if (u_mode != 0) {
        uint label = label_at(v_uv);
        vec4 lut = texelFetch(u_lut, ivec2(int(label), 0), 0);
        colour = lut.rgb;
        alpha = lut.a;
        if (u_mode == 2) {
            bool edge = label_at(v_uv + vec2(u_step.x, 0.0)) != label
                     || label_at(v_uv - vec2(u_step.x, 0.0)) != label
                     || label_at(v_uv + vec2(0.0, u_step.y)) != label
                     || label_at(v_uv - vec2(0.0, u_step.y)) != label;
            alpha = (edge && alpha > 0.0) ? 1.0 : 0.0;
        }
    }
    o_colour = vec4(mix(base, colour, clamp(alpha * u_opacity, 0.0, 1.0)), 1.0);
}
"""

# The status line: an RGBA text texture blended over the picture.
TEXT_FRAGMENT = """
in vec2 v_uv;
out vec4 o_colour;
uniform sampler2D u_text;
void main() {
    o_colour = texture(u_text, v_uv);
}
"""


def source(body: str, dialect: Dialect) -> str:
    """``body`` with the version header (and precisions) of ``dialect``."""
    return _HEADERS[dialect] + body
