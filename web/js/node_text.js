// Shows the text a Cinetune node returns (ui "text": the Dataset Folder and cacher summaries, the memory estimates)
// on the node itself, in a read-only box under its widgets.
//
// The text box is a DOM widget that is never serialized: it stays out of widgets_values in saved workflows (which
// store widget values by position) and out of API prompts. Its <textarea> carries data-cinetune-text="summary" for
// tests.

const { app } = window.comfyAPI.app;

const WIDGET_NAME = "cinetune_text";
const MIN_HEIGHT = 60;

function isCinetune(nodeData) {
    return typeof nodeData?.name === "string" && nodeData.name.startsWith("Cinetune");
}

function showText(node, lines) {
    let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
    if (!widget) {
        const box = document.createElement("textarea");
        box.readOnly = true;
        box.dataset.cinetuneText = "summary";
        box.style.cssText = "width:100%;height:100%;resize:none;font:11px monospace;white-space:pre-wrap;"
            + "background:var(--comfy-input-bg);color:var(--input-text);border:none;box-sizing:border-box;";
        widget = node.addDOMWidget(WIDGET_NAME, "cinetune_text", box, {
            serialize: false,
            getMinHeight: () => MIN_HEIGHT,
            getValue: () => undefined,
            setValue: () => {},
        });
        widget.serialize = false;
        widget.serializeValue = () => undefined;
    }
    widget.element.value = lines.join("\n");
    const [width, height] = node.size;
    node.setSize([width, Math.max(height, node.computeSize()[1])]);
    node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
    name: "cinetune.nodeText",
    beforeRegisterNodeDef(nodeType, nodeData) {
        if (!isCinetune(nodeData)) return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            const result = onExecuted?.apply(this, arguments);
            const text = message?.text;
            if (Array.isArray(text) && text.length) showText(this, text.map(String));
            return result;
        };
    },
});
