"""The LSTM cell as the tutorial tells it: two memories, an event and four gates.

Drawn by the documentation build (``.. plot::``); run it alone to see the figure.
"""

import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch

LTM_Y, BUS_Y = 6.0, 1.4
COLOURS = {
    "forget": "#f4a3a3",
    "learn": "#a3c9f4",
    "remember": "#b6e3a8",
    "use": "#f6d58e",
}


def arrow(ax, start, end, colour="0.25", width=1.6):
    ax.annotate(
        "",
        xy=end,
        xytext=start,
        arrowprops={"arrowstyle": "-|>", "color": colour, "lw": width, "shrinkA": 0, "shrinkB": 0},
    )


def line(ax, xs, ys, colour="0.25", width=1.6):
    ax.plot(xs, ys, color=colour, lw=width, solid_capstyle="round")


def gate(ax, centre, size, name, equations):
    x, y = centre
    w, h = size
    box = FancyBboxPatch(
        (x - w / 2, y - h / 2),
        w,
        h,
        boxstyle="round,pad=0.08,rounding_size=0.25",
        facecolor=COLOURS[name],
        edgecolor="0.3",
        lw=1.2,
        zorder=3,
    )
    ax.add_patch(box)
    ax.text(
        x,
        y + h / 2 - 0.32,
        f"{name} gate",
        ha="center",
        va="center",
        zorder=4,
        fontsize=12,
        weight="bold",
    )
    ax.text(
        x,
        y - 0.18,
        "\n".join(equations),
        ha="center",
        va="center",
        zorder=4,
        fontsize=10.5,
        linespacing=1.6,
    )


def node(ax, centre, symbol):
    ax.add_patch(plt.Circle(centre, 0.28, facecolor="white", edgecolor="0.25", lw=1.6, zorder=5))
    ax.text(*centre, symbol, ha="center", va="center", fontsize=15, zorder=6)


def draw():
    fig, ax = plt.subplots(figsize=(11, 6.2))
    ax.set_xlim(-0.6, 13.2)
    ax.set_ylim(-0.9, 7.3)
    ax.set_axis_off()
    ax.set_aspect("equal")

    # The two memories: long-term on top, short-term and event in the bus below.
    ltm = "#b03030"
    line(ax, [0.6, 12.0], [LTM_Y, LTM_Y], ltm, 3)
    arrow(ax, (11.4, LTM_Y), (12.3, LTM_Y), ltm, 3)
    ax.text(0.5, LTM_Y + 0.45, "long-term memory $c_{t-1}$", color=ltm, fontsize=12, ha="left")
    ax.text(12.4, LTM_Y + 0.45, "$c_t$", color=ltm, fontsize=13, ha="center")

    stm = "#2a5fa0"
    line(ax, [0.6, 2.0], [BUS_Y, BUS_Y], stm, 3)
    ax.text(0.5, BUS_Y + 0.45, "short-term memory $h_{t-1}$", color=stm, fontsize=12, ha="left")
    ax.text(2.0, -0.75, "event $x_t$", color="0.15", fontsize=12, ha="center")
    arrow(ax, (2.0, -0.4), (2.0, BUS_Y - 0.05), "0.15", 2)
    line(ax, [2.0, 9.6], [BUS_Y, BUS_Y], "0.35", 2.2)
    ax.text(
        5.6,
        BUS_Y - 0.45,
        "$[h_{t-1}, x_t]$ feeds every gate",
        color="0.35",
        fontsize=10.5,
        ha="center",
    )

    # forget: LTM times the forget factor.
    node(ax, (3.0, LTM_Y), r"$\times$")
    gate(
        ax,
        (3.0, 3.65),
        (2.6, 1.75),
        "forget",
        [r"$f_t = \sigma(a^f_t)$", r"keeps $f_t \odot c_{t-1}$"],
    )
    line(ax, [3.0, 3.0], [BUS_Y, 2.6])
    arrow(ax, (3.0, 4.7), (3.0, LTM_Y - 0.3))

    # learn: a candidate from STM and event, times the ignore factor.
    gate(
        ax,
        (6.2, 3.65),
        (2.8, 1.75),
        "learn",
        [r"$g_t = \tanh(a^g_t)$, $i_t = \sigma(a^i_t)$", r"learns $i_t \odot g_t$"],
    )
    line(ax, [6.2, 6.2], [BUS_Y, 2.6])
    arrow(ax, (6.2, 4.7), (6.2, LTM_Y - 0.3))

    # remember: the sum is the new LTM.
    node(ax, (6.2, LTM_Y), "+")
    ax.add_patch(
        FancyBboxPatch(
            (4.35, LTM_Y + 0.42),
            3.7,
            0.78,
            boxstyle="round,pad=0.05,rounding_size=0.2",
            facecolor=COLOURS["remember"],
            edgecolor="0.3",
            lw=1.2,
        )
    )
    ax.text(
        6.2,
        LTM_Y + 0.81,
        r"remember: $c_t = f_t \odot c_{t-1} + i_t \odot g_t$",
        ha="center",
        va="center",
        fontsize=10.5,
    )

    # use: what of the memory to output, the new STM.
    gate(
        ax,
        (9.9, 3.65),
        (2.9, 1.75),
        "use",
        [r"$o_t = \sigma(a^o_t)$", r"$h_t = o_t \odot \tanh(c_t)$"],
    )
    line(ax, [9.6, 9.6], [BUS_Y, 2.6])
    arrow(ax, (10.5, LTM_Y), (10.5, 4.7), ltm, 2)
    line(ax, [10.5, 10.5], [2.6, BUS_Y], stm, 3)
    line(ax, [10.5, 12.0], [BUS_Y, BUS_Y], stm, 3)
    arrow(ax, (11.4, BUS_Y), (12.3, BUS_Y), stm, 3)
    ax.text(12.4, BUS_Y + 0.45, "$h_t$", color=stm, fontsize=13, ha="center")
    arrow(ax, (11.3, BUS_Y), (11.3, -0.35), stm, 2)
    ax.text(11.45, -0.7, "output $y_t = h_t$", color=stm, fontsize=11, ha="left")
    fig.tight_layout()
    return fig


draw()
if __name__ == "__main__":
    plt.show()
