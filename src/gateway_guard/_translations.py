# ruff: noqa: RUF001  (full-width punctuation is correct in Japanese and Chinese)
"""The built-in translations of the visitor's words, one mapping per language.

English lives in :mod:`gateway_guard._copy` (the source every other language follows);
each mapping here has exactly English's keys, except the plural forms, which follow each
language's own CLDR plural categories (``one``/``other`` for most, ``other`` only for
Japanese and Chinese, six forms for Arabic). ``{placeholders}`` keep English's names.
Checked key by key by tests/test_i18n.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

__all__ = ["TRANSLATIONS"]

_DE: Final = {
    "error_code": "Fehler {status}: {phrase}",
    "phrase_500": "Interner Serverfehler",
    "phrase_502": "Fehlerhaftes Gateway",
    "phrase_503": "Dienst nicht verfügbar",
    "phrase_504": "Gateway-Zeitüberschreitung",
    "timeout_heading": "Das dauert zu lange",
    "timeout_message": (
        "Ein Dienst, auf den wir angewiesen sind, hat nicht rechtzeitig geantwortet."
    ),
    "unreachable_heading": "Ein Teil unseres Dienstes ist nicht erreichbar",
    "unreachable_message": "Ein Dienst, auf den wir angewiesen sind, war nicht erreichbar.",
    "bad_response_heading": "Bei uns ist etwas schiefgelaufen",
    "bad_response_message": (
        "Ein Dienst, auf den wir angewiesen sind, hat uns eine unbrauchbare Antwort geschickt."
    ),
    "error_status_heading": "Bei uns ist etwas schiefgelaufen",
    "error_status_message": (
        "Ein Dienst, auf den wir angewiesen sind, hat mit einem Fehler geantwortet."
    ),
    "unavailable_heading": "Vorübergehend nicht verfügbar",
    "unavailable_message": (
        "Ein Dienst, auf den wir angewiesen sind, hat Probleme. Damit er sich erholen kann, "
        "schicken wir ihm kurz keine Anfragen."
    ),
    "overloaded_heading": "Gerade ist sehr viel los",
    "overloaded_message": "Wir erhalten im Moment mehr Anfragen, als wir bearbeiten können.",
    "misconfigured_heading": "Bei uns ist etwas schiefgelaufen",
    "misconfigured_message": (
        "Ein Problem mit unserer Einrichtung hindert uns daran, einen Dienst zu erreichen, "
        "auf den wir angewiesen sind."
    ),
    "app_error_heading": "Bei uns ist etwas schiefgelaufen",
    "app_error_message": (
        "Wir konnten Ihre Anfrage wegen eines Problems auf unserer Seite nicht abschließen."
    ),
    "app_unavailable_heading": "Vorübergehend nicht verfügbar",
    "app_unavailable_message": "Dieser Dienst ist vorübergehend nicht verfügbar.",
    "app_timeout_heading": "Das dauert zu lange",
    "app_timeout_message": "Wir konnten Ihre Anfrage nicht rechtzeitig abschließen.",
    "not_your_device": "Es liegt nicht an Ihrem Gerät oder Ihrer Internetverbindung.",
    "advice_wait": "Bitte versuchen Sie es in {duration} erneut.",
    "advice_soon": "Bitte versuchen Sie es in wenigen Augenblicken erneut.",
    "advice_misconfigured": (
        "Ein erneuter Versuch hilft wahrscheinlich erst, wenn wir das Problem behoben haben."
    ),
    "caution": (
        "Falls Sie gerade etwas gesendet haben, etwa ein Formular, eine Bestellung oder eine "
        "Zahlung, prüfen Sie bitte, ob es angekommen ist, bevor Sie es erneut senden, damit "
        "es nicht doppelt ausgeführt wird."
    ),
    "resubmit": (
        "Um es erneut zu versuchen, gehen Sie zur vorigen Seite zurück und senden Sie das "
        "Formular noch einmal ab."
    ),
    "try_again": "Erneut versuchen",
    "countdown_wait": "Erneuter Versuch möglich in",
    "countdown_done": "Sie können es jetzt erneut versuchen.",
    "home": "Zur Startseite",
    "status_page": "Zu unserer Statusseite",
    "support": "Support kontaktieren",
    "reference": (
        "Wenn Sie uns deswegen kontaktieren, nennen Sie bitte die Referenz {reference} und "
        "die Uhrzeit, {time}."
    ),
    "status_page_label": "Statusseite",
    "support_label": "Support",
    "reference_label": "Referenz",
    "second_one": "{n} Sekunde",
    "second_other": "{n} Sekunden",
    "minute_one": "{n} Minute",
    "minute_other": "{n} Minuten",
    "hour_one": "{n} Stunde",
    "hour_other": "{n} Stunden",
}

_FR: Final = {
    "error_code": "Erreur {status}\u00a0: {phrase}",
    "phrase_500": "Erreur interne du serveur",
    "phrase_502": "Passerelle incorrecte",
    "phrase_503": "Service indisponible",
    "phrase_504": "Délai de la passerelle dépassé",
    "timeout_heading": "Cela prend trop de temps",
    "timeout_message": "Un service dont nous dépendons n'a pas répondu à temps.",
    "unreachable_heading": "Une partie de notre service est injoignable",
    "unreachable_message": "Un service dont nous dépendons n'a pas pu être joint.",
    "bad_response_heading": "Un problème est survenu de notre côté",
    "bad_response_message": (
        "Un service dont nous dépendons nous a envoyé une réponse que nous ne pouvons pas utiliser."
    ),
    "error_status_heading": "Un problème est survenu de notre côté",
    "error_status_message": "Un service dont nous dépendons a répondu par une erreur.",
    "unavailable_heading": "Temporairement indisponible",
    "unavailable_message": (
        "Un service dont nous dépendons rencontre des problèmes\u00a0: nous suspendons "
        "brièvement nos requêtes pour lui laisser le temps de se rétablir."
    ),
    "overloaded_heading": "Nous sommes très sollicités en ce moment",
    "overloaded_message": (
        "Nous recevons plus de requêtes que nous ne pouvons en traiter pour le moment."
    ),
    "misconfigured_heading": "Un problème est survenu de notre côté",
    "misconfigured_message": (
        "Un problème de configuration nous empêche de joindre un service dont nous dépendons."
    ),
    "app_error_heading": "Un problème est survenu de notre côté",
    "app_error_message": (
        "Nous n'avons pas pu traiter votre demande à cause d'un problème de notre côté."
    ),
    "app_unavailable_heading": "Temporairement indisponible",
    "app_unavailable_message": "Ce service est temporairement indisponible.",
    "app_timeout_heading": "Cela prend trop de temps",
    "app_timeout_message": "Nous n'avons pas pu traiter votre demande à temps.",
    "not_your_device": (
        "Le problème ne vient ni de votre appareil ni de votre connexion à Internet."
    ),
    "advice_wait": "Veuillez réessayer dans {duration}.",
    "advice_soon": "Veuillez réessayer dans quelques instants.",
    "advice_misconfigured": (
        "Réessayer ne servira probablement à rien tant que nous n'aurons pas corrigé le problème."
    ),
    "caution": (
        "Si vous envoyiez quelque chose, comme un formulaire, une commande ou un paiement, "
        "vérifiez s'il a été pris en compte avant de le renvoyer, pour qu'il ne soit pas "
        "traité deux fois."
    ),
    "resubmit": (
        "Pour réessayer, revenez à la page précédente et envoyez de nouveau le formulaire."
    ),
    "try_again": "Réessayer",
    "countdown_wait": "Vous pourrez réessayer dans",
    "countdown_done": "Vous pouvez réessayer maintenant.",
    "home": "Retour à l'accueil",
    "status_page": "Consulter notre page d'état",
    "support": "Contacter l'assistance",
    "reference": (
        "Si vous nous contactez à ce sujet, indiquez la référence {reference} et l'heure, {time}."
    ),
    "status_page_label": "Page d'état",
    "support_label": "Assistance",
    "reference_label": "Référence",
    "second_one": "{n}\u00a0seconde",
    "second_other": "{n}\u00a0secondes",
    "minute_one": "{n}\u00a0minute",
    "minute_other": "{n}\u00a0minutes",
    "hour_one": "{n}\u00a0heure",
    "hour_other": "{n}\u00a0heures",
}

_ES: Final = {
    "error_code": "Error {status}: {phrase}",
    "phrase_500": "Error interno del servidor",
    "phrase_502": "Puerta de enlace incorrecta",
    "phrase_503": "Servicio no disponible",
    "phrase_504": "Tiempo de espera de la puerta de enlace agotado",
    "timeout_heading": "Esto está tardando demasiado",
    "timeout_message": "Un servicio del que dependemos no respondió a tiempo.",
    "unreachable_heading": "No podemos conectar con parte de nuestro servicio",
    "unreachable_message": "No se pudo conectar con un servicio del que dependemos.",
    "bad_response_heading": "Algo ha fallado por nuestra parte",
    "bad_response_message": (
        "Un servicio del que dependemos nos envió una respuesta que no podemos usar."
    ),
    "error_status_heading": "Algo ha fallado por nuestra parte",
    "error_status_message": "Un servicio del que dependemos respondió con un error.",
    "unavailable_heading": "No disponible temporalmente",
    "unavailable_message": (
        "Un servicio del que dependemos tiene problemas, así que pausamos brevemente las "
        "solicitudes para que se recupere."
    ),
    "overloaded_heading": "Ahora mismo tenemos mucha actividad",
    "overloaded_message": (
        "Estamos recibiendo más solicitudes de las que podemos atender en este momento."
    ),
    "misconfigured_heading": "Algo ha fallado por nuestra parte",
    "misconfigured_message": (
        "Un problema en nuestra configuración nos impide conectar con un servicio del que "
        "dependemos."
    ),
    "app_error_heading": "Algo ha fallado por nuestra parte",
    "app_error_message": (
        "No hemos podido completar tu solicitud por un problema de nuestra parte."
    ),
    "app_unavailable_heading": "No disponible temporalmente",
    "app_unavailable_message": "Este servicio no está disponible temporalmente.",
    "app_timeout_heading": "Esto está tardando demasiado",
    "app_timeout_message": "No hemos podido completar tu solicitud a tiempo.",
    "not_your_device": "No es un problema de tu dispositivo ni de tu conexión a internet.",
    "advice_wait": "Vuelve a intentarlo dentro de {duration}.",
    "advice_soon": "Vuelve a intentarlo en unos momentos.",
    "advice_misconfigured": (
        "Probablemente no servirá de nada volver a intentarlo hasta que lo hayamos solucionado."
    ),
    "caution": (
        "Si estabas enviando algo, como un formulario, un pedido o un pago, comprueba si se "
        "ha procesado antes de volver a enviarlo, para que no se haga dos veces."
    ),
    "resubmit": (
        "Para volver a intentarlo, regresa a la página anterior y envía el formulario de nuevo."
    ),
    "try_again": "Reintentar",
    "countdown_wait": "Podrás volver a intentarlo en",
    "countdown_done": "Ya puedes volver a intentarlo.",
    "home": "Volver a la página de inicio",
    "status_page": "Consultar nuestra página de estado",
    "support": "Contactar con soporte",
    "reference": (
        "Si nos contactas por este motivo, indica la referencia {reference} y la hora, {time}."
    ),
    "status_page_label": "Página de estado",
    "support_label": "Soporte",
    "reference_label": "Referencia",
    "second_one": "{n} segundo",
    "second_other": "{n} segundos",
    "minute_one": "{n} minuto",
    "minute_other": "{n} minutos",
    "hour_one": "{n} hora",
    "hour_other": "{n} horas",
}

_PT: Final = {
    "error_code": "Erro {status}: {phrase}",
    "phrase_500": "Erro interno do servidor",
    "phrase_502": "Gateway inválido",
    "phrase_503": "Serviço indisponível",
    "phrase_504": "Tempo limite do gateway esgotado",
    "timeout_heading": "Isso está demorando demais",
    "timeout_message": "Um serviço do qual dependemos não respondeu a tempo.",
    "unreachable_heading": "Não conseguimos acessar parte do nosso serviço",
    "unreachable_message": "Não foi possível acessar um serviço do qual dependemos.",
    "bad_response_heading": "Algo deu errado do nosso lado",
    "bad_response_message": (
        "Um serviço do qual dependemos enviou uma resposta que não conseguimos usar."
    ),
    "error_status_heading": "Algo deu errado do nosso lado",
    "error_status_message": "Um serviço do qual dependemos respondeu com um erro.",
    "unavailable_heading": "Temporariamente indisponível",
    "unavailable_message": (
        "Um serviço do qual dependemos está com problemas, por isso pausamos por um instante "
        "as solicitações a ele para que se recupere."
    ),
    "overloaded_heading": "Estamos muito ocupados agora",
    "overloaded_message": (
        "Estamos recebendo mais solicitações do que conseguimos atender no momento."
    ),
    "misconfigured_heading": "Algo deu errado do nosso lado",
    "misconfigured_message": (
        "Um problema na nossa configuração nos impede de acessar um serviço do qual dependemos."
    ),
    "app_error_heading": "Algo deu errado do nosso lado",
    "app_error_message": (
        "Não conseguimos concluir sua solicitação por causa de um problema do nosso lado."
    ),
    "app_unavailable_heading": "Temporariamente indisponível",
    "app_unavailable_message": "Este serviço está temporariamente indisponível.",
    "app_timeout_heading": "Isso está demorando demais",
    "app_timeout_message": "Não conseguimos concluir sua solicitação a tempo.",
    "not_your_device": (
        "O problema não está no seu dispositivo nem na sua conexão com a internet."
    ),
    "advice_wait": "Tente novamente em {duration}.",
    "advice_soon": "Tente novamente em alguns instantes.",
    "advice_misconfigured": (
        "Tentar novamente provavelmente não vai adiantar até corrigirmos o problema."
    ),
    "caution": (
        "Se você estava enviando algo, como um formulário, um pedido ou um pagamento, "
        "verifique se foi concluído antes de enviar de novo, para que não seja feito duas "
        "vezes."
    ),
    "resubmit": "Para tentar novamente, volte à página anterior e envie o formulário de novo.",
    "try_again": "Tentar novamente",
    "countdown_wait": "Você poderá tentar novamente em",
    "countdown_done": "Você já pode tentar novamente.",
    "home": "Voltar à página inicial",
    "status_page": "Ver nossa página de status",
    "support": "Falar com o suporte",
    "reference": (
        "Se entrar em contato conosco sobre isso, informe a referência {reference} e o "
        "horário, {time}."
    ),
    "status_page_label": "Página de status",
    "support_label": "Suporte",
    "reference_label": "Referência",
    "second_one": "{n} segundo",
    "second_other": "{n} segundos",
    "minute_one": "{n} minuto",
    "minute_other": "{n} minutos",
    "hour_one": "{n} hora",
    "hour_other": "{n} horas",
}

_JA: Final = {
    "error_code": "エラー {status}: {phrase}",
    "phrase_500": "サーバー内部エラー",
    "phrase_502": "不正なゲートウェイ",
    "phrase_503": "サービス利用不可",
    "phrase_504": "ゲートウェイタイムアウト",
    "timeout_heading": "時間がかかりすぎています",
    "timeout_message": "連携しているサービスから時間内に応答がありませんでした。",
    "unreachable_heading": "サービスの一部に接続できません",
    "unreachable_message": "連携しているサービスに接続できませんでした。",
    "bad_response_heading": "こちら側で問題が発生しました",
    "bad_response_message": "連携しているサービスから、処理できない応答が返されました。",
    "error_status_heading": "こちら側で問題が発生しました",
    "error_status_message": "連携しているサービスがエラーを返しました。",
    "unavailable_heading": "一時的に利用できません",
    "unavailable_message": (
        "連携しているサービスに問題が発生しているため、回復を待つあいだ一時的に"
        "リクエストを停止しています。"
    ),
    "overloaded_heading": "ただいま大変混み合っています",
    "overloaded_message": "現在、処理できる数を超えるリクエストを受けています。",
    "misconfigured_heading": "こちら側で問題が発生しました",
    "misconfigured_message": "設定上の問題により、連携しているサービスに接続できません。",
    "app_error_heading": "こちら側で問題が発生しました",
    "app_error_message": "こちら側の問題により、リクエストを完了できませんでした。",
    "app_unavailable_heading": "一時的に利用できません",
    "app_unavailable_message": "このサービスは一時的に利用できません。",
    "app_timeout_heading": "時間がかかりすぎています",
    "app_timeout_message": "時間内にリクエストを完了できませんでした。",
    "not_your_device": "お使いの端末やインターネット接続の問題ではありません。",
    "advice_wait": "{duration}後にもう一度お試しください。",
    "advice_soon": "しばらくしてからもう一度お試しください。",
    "advice_misconfigured": (
        "問題が解決するまでは、もう一度お試しいただいても改善しない可能性があります。"
    ),
    "caution": (
        "フォームの送信、注文、支払いなどを行っていた場合は、二重に処理されないよう、"
        "もう一度送信する前に完了しているかどうかをご確認ください。"
    ),
    "resubmit": "もう一度お試しになるには、前のページに戻ってフォームを再送信してください。",
    "try_again": "再試行",
    "countdown_wait": "再試行できるまで",
    "countdown_done": "もう一度お試しいただけます。",
    "home": "ホームページに戻る",
    "status_page": "ステータスページを確認",
    "support": "サポートに問い合わせる",
    "reference": "お問い合わせの際は、参照番号 {reference} と日時（{time}）をお伝えください。",
    "status_page_label": "ステータスページ",
    "support_label": "サポート",
    "reference_label": "参照番号",
    "second_other": "{n}秒",
    "minute_other": "{n}分",
    "hour_other": "{n}時間",
}

_ZH_HANS: Final = {
    "error_code": "错误 {status}：{phrase}",
    "phrase_500": "服务器内部错误",
    "phrase_502": "网关错误",
    "phrase_503": "服务不可用",
    "phrase_504": "网关超时",
    "timeout_heading": "响应时间过长",
    "timeout_message": "我们依赖的一项服务未能及时响应。",
    "unreachable_heading": "无法连接到我们的部分服务",
    "unreachable_message": "无法连接到我们依赖的一项服务。",
    "bad_response_heading": "我们这边出了点问题",
    "bad_response_message": "我们依赖的一项服务返回了无法使用的响应。",
    "error_status_heading": "我们这边出了点问题",
    "error_status_message": "我们依赖的一项服务返回了错误。",
    "unavailable_heading": "暂时无法使用",
    "unavailable_message": (
        "我们依赖的一项服务出现了问题，为便于其恢复，我们暂时停止向它发送请求。"
    ),
    "overloaded_heading": "当前访问量过大",
    "overloaded_message": "我们目前收到的请求超出了处理能力。",
    "misconfigured_heading": "我们这边出了点问题",
    "misconfigured_message": "由于我们的配置问题，无法连接到我们依赖的一项服务。",
    "app_error_heading": "我们这边出了点问题",
    "app_error_message": "由于我们这边的问题，您的请求未能完成。",
    "app_unavailable_heading": "暂时无法使用",
    "app_unavailable_message": "此服务暂时不可用。",
    "app_timeout_heading": "响应时间过长",
    "app_timeout_message": "我们未能及时完成您的请求。",
    "not_your_device": "这不是您的设备或网络连接的问题。",
    "advice_wait": "请在{duration}后重试。",
    "advice_soon": "请稍后重试。",
    "advice_misconfigured": "在我们修复问题之前，重试可能无济于事。",
    "caution": (
        "如果您刚才在提交内容（例如表单、订单或付款），请先确认是否已经成功，再重新提交，"
        "以免重复处理。"
    ),
    "resubmit": "如需重试，请返回上一页并重新提交表单。",
    "try_again": "重试",
    "countdown_wait": "可重试倒计时",
    "countdown_done": "现在可以重试了。",
    "home": "返回首页",
    "status_page": "查看服务状态页",
    "support": "联系客服",
    "reference": "如需就此联系我们，请提供参考编号 {reference} 和时间（{time}）。",
    "status_page_label": "状态页",
    "support_label": "客服",
    "reference_label": "参考编号",
    "second_other": "{n} 秒",
    "minute_other": "{n} 分钟",
    "hour_other": "{n} 小时",
}

_AR: Final = {
    "error_code": "خطأ {status}: {phrase}",
    "phrase_500": "خطأ داخلي في الخادم",
    "phrase_502": "بوابة غير صالحة",
    "phrase_503": "الخدمة غير متاحة",
    "phrase_504": "انتهت مهلة البوابة",
    "timeout_heading": "يستغرق هذا وقتًا طويلًا",
    "timeout_message": "لم تستجب إحدى الخدمات التي نعتمد عليها في الوقت المحدد.",
    "unreachable_heading": "تعذّر الوصول إلى جزء من خدمتنا",
    "unreachable_message": "تعذّر الوصول إلى إحدى الخدمات التي نعتمد عليها.",
    "bad_response_heading": "حدث خطأ من جهتنا",
    "bad_response_message": "أرسلت إلينا إحدى الخدمات التي نعتمد عليها ردًا لا يمكننا استخدامه.",
    "error_status_heading": "حدث خطأ من جهتنا",
    "error_status_message": "ردّت إحدى الخدمات التي نعتمد عليها بخطأ.",
    "unavailable_heading": "غير متاح مؤقتًا",
    "unavailable_message": (
        "تواجه إحدى الخدمات التي نعتمد عليها مشكلات، لذا نوقف الطلبات إليها لفترة قصيرة حتى تتعافى."
    ),
    "overloaded_heading": "نشهد ضغطًا كبيرًا حاليًا",
    "overloaded_message": "نتلقى حاليًا طلبات أكثر مما يمكننا معالجته.",
    "misconfigured_heading": "حدث خطأ من جهتنا",
    "misconfigured_message": "تمنعنا مشكلة في إعداداتنا من الوصول إلى خدمة نعتمد عليها.",
    "app_error_heading": "حدث خطأ من جهتنا",
    "app_error_message": "تعذّر علينا إكمال طلبك بسبب مشكلة من جهتنا.",
    "app_unavailable_heading": "غير متاح مؤقتًا",
    "app_unavailable_message": "هذه الخدمة غير متاحة مؤقتًا.",
    "app_timeout_heading": "يستغرق هذا وقتًا طويلًا",
    "app_timeout_message": "تعذّر علينا إكمال طلبك في الوقت المحدد.",
    "not_your_device": "المشكلة ليست في جهازك ولا في اتصالك بالإنترنت.",
    "advice_wait": "يُرجى المحاولة مرة أخرى بعد {duration}.",
    "advice_soon": "يُرجى المحاولة مرة أخرى بعد قليل.",
    "advice_misconfigured": "على الأرجح لن تفيد المحاولة مرة أخرى قبل أن نصلح المشكلة.",
    "caution": (
        "إذا كنت ترسل شيئًا، مثل نموذج أو طلب شراء أو دفعة، فتحقّق مما إذا كان قد تمّ قبل "
        "إرساله مرة أخرى، حتى لا يُنفَّذ مرتين."
    ),
    "resubmit": "للمحاولة مرة أخرى، ارجع إلى الصفحة السابقة وأرسل النموذج من جديد.",
    "try_again": "أعد المحاولة",
    "countdown_wait": "يمكنك المحاولة مرة أخرى بعد",
    "countdown_done": "يمكنك المحاولة مرة أخرى الآن.",
    "home": "العودة إلى الصفحة الرئيسية",
    "status_page": "اطّلع على صفحة الحالة",
    "support": "تواصل مع الدعم",
    "reference": "إذا تواصلت معنا بشأن هذا، فيُرجى ذكر المرجع {reference} والوقت، {time}.",
    "status_page_label": "صفحة الحالة",
    "support_label": "الدعم",
    "reference_label": "المرجع",
    "second_zero": "{n} ثانية",
    "second_one": "ثانية واحدة",
    "second_two": "ثانيتين",
    "second_few": "{n} ثوانٍ",
    "second_many": "{n} ثانية",
    "second_other": "{n} ثانية",
    "minute_zero": "{n} دقيقة",
    "minute_one": "دقيقة واحدة",
    "minute_two": "دقيقتين",
    "minute_few": "{n} دقائق",
    "minute_many": "{n} دقيقة",
    "minute_other": "{n} دقيقة",
    "hour_zero": "{n} ساعة",
    "hour_one": "ساعة واحدة",
    "hour_two": "ساعتين",
    "hour_few": "{n} ساعات",
    "hour_many": "{n} ساعة",
    "hour_other": "{n} ساعة",
}

#: Language tag -> its words. English (the source) is :data:`gateway_guard._copy.ENGLISH`.
TRANSLATIONS: Final[Mapping[str, Mapping[str, str]]] = {
    "de": _DE,
    "fr": _FR,
    "es": _ES,
    "pt": _PT,
    "ja": _JA,
    "zh-Hans": _ZH_HANS,
    "ar": _AR,
}
