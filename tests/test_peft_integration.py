"""The PEFT seam: the REGISTERS method is known to peft whichever is imported first and wherever peft comes from."""

import subprocess
import sys
import textwrap

import pytest


@pytest.mark.slow  # a fresh Python process imports torch, transformers and peft
def test_the_method_is_registered_when_peft_is_found_by_a_finder_of_its_own():
    """As with an editable install of peft: peft is not on ``sys.path`` but served by a meta path finder."""
    script = textwrap.dedent(
        """
        import importlib.machinery, importlib.metadata, importlib.util, os, sys

        site = os.path.dirname(os.path.dirname(importlib.util.find_spec("peft").origin))
        sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != site]


        class SitePackagesFinder:
            def find_spec(self, name, path=None, target=None):
                return importlib.machinery.PathFinder.find_spec(name, path or [site])

            def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
                context = importlib.metadata.DistributionFinder.Context(name=context.name, path=[site])
                return importlib.metadata.MetadataPathFinder.find_distributions(context)


        sys.meta_path.append(SitePackagesFinder())
        import register_adapter
        from peft import mapping

        print(mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(register_adapter.REGISTERS).__name__)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["RegisterModel"]
