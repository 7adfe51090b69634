from django.apps import AppConfig


class ShopConfig(AppConfig):
    name = "tests.minimal_project.shop"
    label = "shop"
