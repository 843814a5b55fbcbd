"""The package surface: what `import vitmha` gives and what it costs."""
import subprocess
import sys


def test_plain_import_is_light_and_subpackages_resolve():
    code = ("import sys, vitmha; assert 'lightning' not in sys.modules, 'import vitmha pulled in Lightning'; "
            "print(vitmha.tasks.ImageClassifier.task, vitmha.tasks.SemanticSegmenter.monitor, "
            "vitmha.data.ImageFolderDataModule.__name__, vitmha.heads.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["classification", "val/miou", "ImageFolderDataModule", "vitmha.heads"]


def test_every_public_subpackage_and_entry_point_resolves_after_import_vitmha():
    code = ("import vitmha; "
            "names = ['tasks', 'data', 'heads', 'models', 'peft', 'explain', 'search', 'robustness', 'inference', "
            "'predictions', 'commands', 'trainer', 'callbacks']; "
            "print(all(getattr(vitmha, n).__name__ == 'vitmha.' + n for n in names), "
            "vitmha.Trainer.__name__, vitmha.load.__name__, vitmha.tasks.MultiLabelClassifier.task)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "Trainer", "load", "multilabel"]
