from services.trainer.worker.celery_app import main

if __name__ == "__main__":
    main()
