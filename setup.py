"""wesar-composer: WeSaR (weight scaling as reparameterization) for Composer and llm-foundry."""

from setuptools import find_packages, setup

setup(
    name='wesar-composer',
    version='0.1.0',
    description='WeSaR (Nishida et al. 2024) as a Composer algorithm for llm-foundry pre-training',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['wesar_composer', 'wesar_composer.*']),
    package_data={'wesar_composer.tools': ['yamls/*.yaml', 'yamls/method/*.yaml']},
    python_requires='>=3.10',
    install_requires=[
        'llm-foundry==0.22.0',
    ],
    extras_require={
        'test': ['pytest>=7', 'pytest-timeout'],
    },
    entry_points={
        'console_scripts': [
            'wesar-data = wesar_composer.tools.data.build:main',
            'wesar-demo = wesar_composer.tools.demo:main',
            'wesar-experiments = wesar_composer.tools.experiments.cli:main',
            'wesar-plot = wesar_composer.tools.plotting:main',
        ],
        'llmfoundry_config_transforms': [
            'wesar_data_check = wesar_composer.tools.data.build:check_train_config',
        ],
        'llmfoundry_algorithms': [
            'wesar = wesar_composer.algorithms.wesar:WeSaR',
            'z_loss = wesar_composer.algorithms.z_loss:ZLoss',
            'paper_init = wesar_composer.algorithms.paper_init:PaperInit',
            'weight_norm = wesar_composer.algorithms.weight_norm:WeightNorm',
            'sigma_reparam = wesar_composer.algorithms.sigma_reparam:SigmaReparam',
            'residual_scaling = wesar_composer.algorithms.residual_scaling:ResidualScaling',
        ],
        'llmfoundry_callbacks': [
            'update_ratio_monitor = wesar_composer.callbacks:UpdateRatioMonitor',
            'loss_spike_counter = wesar_composer.callbacks:LossSpikeCounter',
        ],
    },
)
